"""`cxr predict`'s batch logic in-process (embedded model, the example films): the journal, resume, JSON, FHIR and
the audit trail, asserted on what the run wrote. (The CLI end to end is tested in test_pipeline and test_fhir.)"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from cxr.cli.screen import predict_exit_status
from cxr.client.batch import JOURNAL_SUFFIX, Journal, expand_inputs, file_sha256
from cxr.client.results import JOURNAL_COLUMNS, from_row, to_row
from cxr.core.audit_trail import read, verify
from cxr.doors.predict import PredictOptions, PredictSummary, run_predict
from tests.conftest import REPO

EXAMPLES = REPO / "examples"


@pytest.fixture()
def films(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for name in ("NORMAL/IM-0117-0001.jpeg", "PNEUMONIA/person1003_virus_1685.jpeg", "dicom/chest_dx.dcm",
                 "not_chest/camera.png"):
        shutil.copy(EXAMPLES / name, d / Path(name).name)
    (d / "notes.txt.png").write_bytes(b"not an image")
    return d


def _read(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_run_journals_and_a_rerun_only_redoes_what_is_not_final(films: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.csv"
    opts = PredictOptions(inputs=(films,), protocol="embedded", format="csv", out=out, chunk=2,
                          audit_log=tmp_path / "audit.jsonl")
    summary = run_predict(opts)
    assert summary == PredictSummary(inputs=5, answered=5, ok=3, not_assessable=1, errors=1, out=out)
    assert predict_exit_status(summary) == 1  # the unreadable file is an error: exit 1
    rows = _read(out)
    assert [r["path"] for r in rows] == [str(p) for p in expand_inputs([films])]  # input order, one row each
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["camera.png"]["status"] == "not_assessable" and by_name["camera.png"]["rule"]
    assert by_name["notes.txt.png"]["status"] == "error" and "not an image" in by_name["notes.txt.png"]["reason"]
    assert {by_name[n]["status"] for n in ("IM-0117-0001.jpeg", "person1003_virus_1685.jpeg", "chest_dx.dcm")} == {"ok"}
    assert by_name["chest_dx.dcm"]["sop_instance_uid"]
    journal = out.with_name(out.name + JOURNAL_SUFFIX)
    assert len(_read(journal)) == 5
    first = capsys.readouterr().err
    assert "5 of 5 inputs answered: 3 ok, 1 not assessable, 1 errors" in first

    # a rerun: everything is final (the input error too, for the same content): nothing is sent again
    assert predict_exit_status(run_predict(opts)) == 1
    assert "resuming: 5 of 5 inputs already final" in capsys.readouterr().err
    assert len(_read(journal)) == 5
    # the broken file is replaced: only it is screened again
    shutil.copy(EXAMPLES / "NORMAL" / "IM-0178-0001.jpeg", films / "notes.txt.png")
    assert predict_exit_status(run_predict(opts)) == 0
    assert "resuming: 4 of 5 inputs already final" in capsys.readouterr().err
    assert len(_read(journal)) == 6 and {r["status"] for r in _read(out)} == {"ok", "not_assessable"}
    v = verify(tmp_path / "audit.jsonl")
    assert v.ok
    events = [r["event"] for r in read(tmp_path / "audit.jsonl")]
    assert events.count("screened") == 6 and events.count("result_delivered") == 3  # three CSV writes


def test_json_output_is_numbers_from_the_predictions(films: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert predict_exit_status(run_predict(PredictOptions(inputs=(films / "IM-0117-0001.jpeg", films / "camera.png"),
                                                          protocol="embedded", format="json", out=out))) == 0
    got = json.loads(out.read_text())
    assert isinstance(got[0]["probability"], float) and got[0]["label"] in ("Normal", "Pneumonia")
    assert got[1]["probability"] is None and got[1]["refusal"]["rule"] == "out_of_distribution"
    assert got[1]["refusal"]["value"] > got[1]["refusal"]["limit"]


def test_fhir_bundle_and_audit_of_an_in_process_run(films: Path, tmp_path: Path) -> None:
    b = tmp_path / "b.json"
    opts = PredictOptions(inputs=(films / "chest_dx.dcm", films / "camera.png"), protocol="embedded", fhir_out=b,
                          audit_log=tmp_path / "a.jsonl", priority="urgent")
    assert predict_exit_status(run_predict(opts, delivery=opts.delivery())) == 0
    bundle = json.loads(b.read_text())
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Observation") == 2 and kinds.count("Device") == 1
    recs = read(tmp_path / "a.jsonl")
    delivered = [r for r in recs if r["event"] == "result_delivered"]
    assert len(delivered) == 2 and all(r["detail"]["destination"] == "fhir-file" for r in delivered)
    assert all(r["instance_uid"].startswith(("sha256:", "1.")) for r in recs if r["event"] == "screened")


def test_inputs_from_a_source_are_screened_under_their_names_and_the_unread_ones_reported(
        films: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """run_predict's seam for the hospital's doors: a source (here a stand-in for DICOMweb) lists two instances and
    reads one; the row carries its name, the other is reported, audited as a failed receipt, and exits 1."""
    class Copies:
        where, kind = "the test archive", "copies"

        def find(self) -> tuple[tuple[str, str], ...]:
            return (("1.2.3", "1.2.3.4"), ("1.2.3", "1.2.3.5"))

        def read(self, names: list[str], folder: Path) -> dict[Path, str]:
            f = folder / "x.dcm"
            shutil.copy(films / "chest_dx.dcm", f)
            return {f: "1.2.3.4"}

    out = tmp_path / "r.csv"
    opts = PredictOptions(inputs=(), dicomweb="http://127.0.0.1:1/dicom-web", protocol="embedded", format="csv",
                          out=out, audit_log=tmp_path / "a.jsonl")
    summary = run_predict(opts, source=Copies())
    assert (summary.inputs, summary.answered, summary.unread) == (2, 1, 1) and predict_exit_status(summary) == 1
    assert [r["path"] for r in _read(out)] == ["1.2.3.4"]
    assert "error: 1.2.3.5: could not be read from the test archive" in capsys.readouterr().err
    received = [r for r in read(tmp_path / "a.jsonl") if r["event"] == "received"]
    assert [(r["instance_uid"], r["outcome"], r["detail"]["source"]) for r in received] == [
        ("1.2.3.4", "success", "copies"), ("1.2.3.5", "failure", "copies")]


def test_an_interrupt_just_after_a_chunk_is_written_saves_that_chunk(films: Path, tmp_path: Path,
                                                                     monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM (a KeyboardInterrupt) landing after a chunk's rows reached the journal but before the run's bookkeeping
    in memory: the rows saved are those on disk, so the rerun's count of instances already final matches them."""
    from cxr.client import batch

    class Copies:
        where, kind = "the test archive", "copies"

        def find(self) -> tuple[tuple[str, str], ...]:
            return (("1.2.3", "1.2.3.4"), ("1.2.3", "1.2.3.5"))

        def read(self, names: list[str], folder: Path) -> dict[Path, str]:
            out = {}
            for n in names:
                shutil.copy(films / "chest_dx.dcm", folder / f"{n}.dcm")
                out[folder / f"{n}.dcm"] = n
            return out

    def append(self, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
        self._csv.append(rows)
        raise KeyboardInterrupt("signal 15")  # written and fsynced; Journal.latest not yet updated

    out = tmp_path / "r.csv"
    opts = PredictOptions(inputs=(), dicomweb="http://127.0.0.1:1/dicom-web", protocol="embedded", format="csv",
                          out=out, chunk=1)
    with monkeypatch.context() as m:
        m.setattr(batch.Journal, "append", append)
        with pytest.raises(KeyboardInterrupt):
            run_predict(opts, source=Copies())
    assert [r["path"] for r in _read(out)] == ["1.2.3.4"]
    assert "interrupted: 1 of 2 rows saved" in capsys.readouterr().err
    assert predict_exit_status(run_predict(opts, source=Copies())) == 0
    assert "1 of 2 instances already final" in capsys.readouterr().err
    assert [r["path"] for r in _read(out)] == ["1.2.3.4", "1.2.3.5"]


def test_a_door_the_options_ask_for_must_be_given() -> None:
    """PredictOptions.dicomweb / fhir_* without the hospital's source / delivery (or the reverse) is refused."""
    from cxr.doors.dicomweb import DicomWebSource
    from cxr.doors.fhir import FhirDelivery

    web = PredictOptions(inputs=(), dicomweb="http://127.0.0.1:1/dicom-web", protocol="embedded")
    with pytest.raises(ValueError, match="source"):
        run_predict(web)
    files = PredictOptions(inputs=(Path("x"),), protocol="embedded")
    with pytest.raises(ValueError, match="source"):
        run_predict(files, source=web.source())
    with pytest.raises(ValueError, match="delivery"):
        run_predict(PredictOptions(inputs=(Path("x"),), protocol="embedded", fhir_url="http://127.0.0.1:1/fhir"))
    with pytest.raises(ValueError, match="delivery"):
        run_predict(files, delivery=FhirDelivery(url="http://127.0.0.1:1/fhir"))
    assert files.source() is None and files.delivery() is None
    assert isinstance(web.source(), DicomWebSource)


@pytest.mark.parametrize(("kw", "match"), [
    ({"inputs": ()}, "at least one input"),
    ({"inputs": (Path("x"),), "dicomweb": "http://127.0.0.1:1/dicom-web"}, "not both"),
    ({"inputs": (Path("x"),), "studies": ("1.2",)}, "--dicomweb"),
    ({"inputs": (), "dicomweb": "http://127.0.0.1:1", "ray": "auto"}, "--ray"),
    ({"inputs": (Path("x"),), "priority": "stat"}, "priority"),
    ({"inputs": (Path("x"),), "retries": 0}, "retries"),
    ({"inputs": (Path("x"),), "chunk": 0}, "chunk"),
    ({"inputs": (Path("x"),), "format": "xml"}, "format"),
])
def test_options_are_validated(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PredictOptions(**kw)


def test_journal_latest_row_wins_and_transient_errors_are_not_final(tmp_path: Path) -> None:
    from cxr.client.client import Prediction
    from cxr.core import contract

    j = Journal(tmp_path / "r.csv.journal")
    f = tmp_path / "a.png"
    f.write_bytes(b"abc")
    sha = file_sha256(f)
    down = Prediction(source=str(f), status=contract.Status.ERROR, label=None, probability=None, threshold=0.5, model_name="m", model_version="1", reason="a: server down", retryable=True)
    j.append([to_row(down, sha)])
    assert not j.is_final(str(f), sha)  # a transient failure is retried
    ok = Prediction(source=str(f), status=contract.Status.OK, label="Normal", probability=0.1, threshold=0.5, model_name="m", model_version="1")
    j.append([to_row(ok, sha)])
    assert j.is_final(str(f), sha) and not j.is_final(str(f), "other content")
    j.close()
    again = Journal(tmp_path / "r.csv.journal")  # reopened: the latest row per path wins
    assert from_row(again.latest[str(f)])[0] == ok and tuple(_read(tmp_path / "r.csv.journal")[0]) == JOURNAL_COLUMNS
    again.close()
    assert file_sha256(tmp_path / "missing.png") == ""


class _Interrupted:
    """A source of three instances (copies of one film) whose second batch is interrupted, as SIGINT or SIGTERM
    would (KeyboardInterrupt); it notes where it put its files."""

    where, kind = "the test archive", "copies"

    def __init__(self, film: Path) -> None:
        self.film, self.calls, self.folders = film, 0, []  # type: ignore[var-annotated]

    def find(self) -> tuple[tuple[str, str], ...]:
        return tuple(("1.2.3", f"1.2.3.{i}") for i in range(3))

    def read(self, names: list[str], folder: Path) -> dict[Path, str]:
        self.calls += 1
        self.folders.append(folder)
        out = {}
        for n in names:
            f = folder / f"{n}.dcm"
            shutil.copy(self.film, f)
            out[f] = n
        if self.calls == 2:
            raise KeyboardInterrupt
        return out


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_an_interrupted_stream_saves_its_rows_and_leaves_no_file(films: Path, tmp_path: Path, fmt: str,
                                                                  capsys) -> None:  # type: ignore[no-untyped-def]
    source = _Interrupted(films / "chest_dx.dcm")
    out = tmp_path / f"r.{fmt}"
    opts = PredictOptions(inputs=(), dicomweb="http://127.0.0.1:1/dicom-web", protocol="embedded", format=fmt,
                          out=out, chunk=1)
    with pytest.raises(KeyboardInterrupt):
        run_predict(opts, source=source)
    assert source.calls == 2 and all(not f.exists() for f in source.folders)  # the temporary folder is gone
    assert not source.folders[0].parent.exists()
    saved = _read(out) if fmt == "csv" else json.loads(out.read_text())
    assert [r["path"] for r in saved] == ["1.2.3.0"]
    assert "interrupted: 1 of 3 rows" in capsys.readouterr().err
    if fmt == "csv":  # the rerun reads only what is not final
        source = _Interrupted(films / "chest_dx.dcm")
        source.calls = 5
        assert predict_exit_status(run_predict(opts, source=source)) == 0
        assert source.calls == 7 and [r["path"] for r in _read(out)] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
