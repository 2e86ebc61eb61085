"""A hospital's tools end to end on real films (examples/, so with or without ../shared): site audit exit codes,
evaluate with a refused film, adapt with the result served by the real cxr serve, drift monitor, listener metrics."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.integrity import sha256_file
from cxr.core.model_dir import read_provenance
from cxr.train import data as data_mod
from tests.conftest import REPO, SHIPPED_REPOSITORY, cxr, wait_until

pytestmark = pytest.mark.slow

EXAMPLES = REPO / "examples"


def variants(dest: Path, *, per_film: int, seed: int, gamma: float | None = None, patient_per_variant: bool = False) -> Path:
    """A labelled sample made of the example chest films under acquisition changes (crop, rotation, exposure,
    noise); each example film is one patient (MANIFEST.csv), so splits keep its variants together. ``gamma``
    re-windows every film (a shifted batch). ``patient_per_variant``: every variant is a patient of its own (a
    stand-in for a sample of many patients, where splits and patient bootstraps need more than eight)."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls in ("NORMAL", "PNEUMONIA"):
        (dest / cls).mkdir(parents=True)
        for src in sorted((EXAMPLES / cls).iterdir()):
            base = Image.open(src).convert("L")
            for k in range(per_film):
                w, h = base.size
                c = rng.uniform(0.9, 1.0)
                left, top = rng.uniform(0, 1 - c) * w, rng.uniform(0, 1 - c) * h
                img = base.crop((int(left), int(top), int(left + c * w), int(top + c * h))).rotate(rng.uniform(-4, 4))
                a = np.asarray(img, np.float64) / 255
                a = a ** (gamma if gamma is not None else rng.uniform(0.85, 1.15)) + rng.normal(0, 0.01, a.shape)
                name = f"{src.stem}_v{k:02d}.png"
                Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(dest / cls / name)
                rows.append({"label": cls, "file_name": name, "patient": name if patient_per_variant else src.stem})
    data_mod.write_manifest(dest, rows)
    return dest


def test_site_audit_refuses_samples_that_cannot_show_their_targets(tmp_path: Path) -> None:
    # the eight example films: far too few for any bound to reach the card's targets; nothing is screened
    r = cxr("site-audit", str(EXAMPLES), "--protocol", "embedded", "--out", str(tmp_path / "ten"))
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stdout + r.stderr
    assert ">= 29 Pneumonia and >= 6 Normal patients, >= 149 patients in all" in r.stderr
    assert not (tmp_path / "ten" / "audit.json").exists()
    assert "no patient ids" in r.stderr  # examples/MANIFEST.csv has no patient column
    # one class: one line, exit 2
    one = tmp_path / "one"
    shutil.copytree(EXAMPLES / "PNEUMONIA", one / "PNEUMONIA")
    r = cxr("site-audit", str(one), "--protocol", "embedded")
    assert r.returncode == 2 and "one class" in r.stderr and r.stderr.strip().count("\n") <= 1, r.stderr
    # the plan, before anything is labelled: no sample, no server
    plan = cxr("site-audit", "--plan", "--targets", "sensitivity=0.95", "--url", "127.0.0.1:1")
    assert plan.returncode == 0 and ">= 59 Pneumonia" in plan.stdout, plan.stdout + plan.stderr
    r = cxr("site-audit", "--plan", "--targets", "sensitivity=2")
    assert r.returncode == 2 and "sensitivity" in r.stderr
    (tmp_path / "empty").mkdir()
    r = cxr("site-audit", str(tmp_path / "empty"), "--protocol", "embedded")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "NORMAL/PNEUMONIA" in r.stderr


def test_site_audit_decides_on_bounds_and_sets_aside_the_models_own_films(tmp_path: Path) -> None:
    sample = variants(tmp_path / "site", per_film=20, seed=0, patient_per_variant=True)  # 160 films, 160 patients
    listed = [p for p in EXAMPLES.glob("*/*") if sha256_file(p) in
              {x["sha256"] for x in read_provenance(SHIPPED_REPOSITORY / "pneumonia" / "provenance.csv")}]
    assert listed  # the examples hold films the shipped model learned from
    for f in listed:
        shutil.copy(f, sample / f.parent.name / f.name)
    r = cxr("site-audit", str(sample), "--protocol", "embedded", "--out", str(tmp_path / "good"))
    assert r.returncode in (0, 3), r.stdout + r.stderr
    report = json.loads((tmp_path / "good" / "audit.json").read_text())
    assert report["set_aside"]["films"] == len(listed) and report["n"] == 160  # never scored
    assert f"set aside: {len(listed)} films" in r.stdout
    assert report["patients"] == 160 and report["patients_known"]
    assert report["targets_from"] == "the card" and report["sample_sha256"] and report["attempts"] == []
    assert r.returncode == (0 if all(c["bound"] >= c["target"] if c["op"] == ">=" else c["bound"] <= c["target"]
                                     for c in report["checks"].values()) else 3)
    assert {"counts", "roc", "calibration", "ood_score"} <= set(report["plots"])
    # the same films with their labels swapped: every check that depends on the labels fails
    swapped = tmp_path / "swapped"
    rows = []
    for cls, other in (("NORMAL", "PNEUMONIA"), ("PNEUMONIA", "NORMAL")):
        shutil.copytree(sample / cls, swapped / other)
        rows += [{"label": other, "file_name": p.name, "patient": p.name} for p in sorted((sample / cls).iterdir())]
    data_mod.write_manifest(swapped, rows)  # the patients as they are (without ids, file names guess 46 patients)
    bad = cxr("site-audit", str(swapped), "--protocol", "embedded", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 3, bad.stdout + bad.stderr
    checks = json.loads((tmp_path / "bad" / "audit.json").read_text())["checks"]
    assert not checks["roc_auc"]["holds"] and not checks["sensitivity"]["holds"]
    # the model's own films alone: all set aside, nothing left to audit
    own = tmp_path / "own"
    for f in listed:
        (own / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, own / f.parent.name / f.name)
    r = cxr("site-audit", str(own), "--protocol", "embedded")
    assert r.returncode == 2 and ("0 Pneumonia" in r.stderr or "0 Normal" in r.stderr), r.stderr


def test_site_audit_counts_a_refused_film_as_a_referral_and_lists_it(tmp_path: Path) -> None:
    sample = variants(tmp_path / "sample", per_film=20, seed=3, patient_per_variant=True)
    shutil.copy(EXAMPLES / "not_chest" / "camera.png", sample / "NORMAL" / "camera.png")
    Image.new("RGB", (300, 300), (200, 30, 30)).save(sample / "NORMAL" / "figure.png")
    # the model in service is any folder: --model-repository DIR --model NAME (embedded: no --url needed)
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", tmp_path / "repo" / "pneumonia_elsewhere",
                    ignore=shutil.ignore_patterns("adapt_kit.npz"))
    r = cxr("site-audit", str(sample), "--protocol", "embedded", "--out", str(tmp_path / "a"),
            "--model-repository", str(tmp_path / "repo"), "--model", "pneumonia_elsewhere")
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["model"].startswith("pneumonia_elsewhere v"), report["model"]
    refused = {Path(x["path"]).name: x["rule"] for x in report["refused"]}
    assert {"camera.png": "out_of_distribution", "figure.png": "colour_image"}.items() <= refused.items(), r.stdout
    assert report["specificity"]["n"] == 82  # both refused Normal films are referrals
    assert "figure.png" in r.stdout and r.returncode == 3  # 2 of 162 flagged: the bound is over the card's 2%
    assert not report["checks"]["flagged"]["holds"]


def test_evaluate_lists_refused_films_and_goes_on(tmp_path: Path) -> None:
    sample = tmp_path / "sample"
    shutil.copytree(EXAMPLES / "NORMAL", sample / "NORMAL")
    shutil.copytree(EXAMPLES / "PNEUMONIA", sample / "PNEUMONIA")
    Image.new("RGB", (300, 300), (200, 30, 30)).save(sample / "NORMAL" / "figure.png")
    model = tmp_path / "model" / "model.onnx"  # a copy: evaluate records its command beside the model it scores
    model.parent.mkdir()
    shutil.copy(SHIPPED_REPOSITORY / "pneumonia" / "1" / "model.onnx", model)
    r = cxr("evaluate", "--model", str(model), "--data", str(sample), "--out", str(tmp_path / "eval"), "--n-boot", "50")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert rep["n"] == 9 and [x["rule"] for x in rep["refused"]] == ["colour_image"]
    assert rep["confusion"]["fp"] >= 1  # the refused Normal film is a referral
    assert "colour_image" in r.stdout


def _listed_examples() -> list[Path]:
    """The example films the shipped model's provenance lists (it learned from them)."""
    listed = {x["sha256"] for x in read_provenance(SHIPPED_REPOSITORY / "pneumonia" / "provenance.csv")}
    return [p for p in sorted(EXAMPLES.glob("*/*")) if sha256_file(p) in listed]


def _swapped(dest: Path, **kw: object) -> Path:
    """A site where the model in service is wrong: the example variants with their labels swapped (Normal films
    labelled Pneumonia and the reverse), so a site model can beat it on the same patients."""
    src = variants(dest.parent / f"{dest.name}_src", **kw)  # type: ignore[arg-type]
    rows = []
    for cls, other in (("NORMAL", "PNEUMONIA"), ("PNEUMONIA", "NORMAL")):
        shutil.copytree(src / cls, dest / other)
        rows += [{"label": other, "file_name": p.name, "patient": p.name} for p in sorted((src / cls).iterdir())]
    data_mod.write_manifest(dest, rows)
    return dest


def test_adapt_end_to_end_and_the_new_folder_is_served(tmp_path: Path) -> None:
    from cxr.client import PneumoniaClient
    from cxr.core.claims import Claims
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    sample = _swapped(tmp_path / "site", per_film=40, seed=0, patient_per_variant=True)
    listed = _listed_examples()
    for f in listed:  # films the model learned from: set aside and counted, never in a part
        shutil.copy(f, sample / f.parent.name / f.name)
    out = tmp_path / "repo"
    r = cxr("adapt", str(sample), "--out-repository", str(out), "--name", "pneumonia_site", "--report",
            str(tmp_path / "report"), "--targets", "flagged=0.05", "sensitivity=0.8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"set aside {len(listed)} films" in r.stdout and "auc_difference" in r.stdout
    model_dir = out / "pneumonia_site"
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["adaptation"]["audit"]["go"] and card["calibration"]["threshold"] != json.loads(
        (SHIPPED_REPOSITORY / "pneumonia" / "model_card.json").read_text())["calibration"]["threshold"]
    # go means better: the model in service answered the same audit patients, and lost
    cmp_ = card["adaptation"]["audit"]["comparison"]
    assert cmp_["auc_difference"]["lower"] > 0 and cmp_["sensitivity_difference"]["holds"]
    assert cmp_["service_model"].startswith("pneumonia (") and not cmp_["service"]["go"]
    # the targets that applied (the site's), in the card, the claims and the report
    assert card["site"]["targets_from"].startswith("the site (flagged=0.05 sensitivity=0.8")
    assert "the site (flagged=0.05" in Claims.load(model_dir / "claims.json").notes["targets"]
    assert "targets of the site (flagged=0.05" in (tmp_path / "report" / "audit.md").read_text()
    # the attempt is recorded in the report folder and the card
    attempts = [json.loads(x) for x in (tmp_path / "report" / "attempts.jsonl").read_text().splitlines()]
    assert [a["outcome"] for a in attempts] == ["go"] and card["site"]["attempts"] == attempts
    assert attempts[0]["options"]["seed"] == 0 and attempts[0]["options"]["targets"]["sensitivity"] == 0.8
    prov = read_provenance(model_dir / "provenance.csv")
    files = {role: {x["path"] for x in prov if x["role"] == role and "/site/" in x["path"]}
             for role in ("adapt", "calibration", "audit")}
    assert sum(map(len, files.values())) == 320 and not (files["adapt"] & files["audit"]) and not (
        files["calibration"] & files["audit"])
    assert not {x["sha256"] for x in prov if x["role"] in ("adapt", "calibration", "audit") and "/site/" in x["path"]} & {
        sha256_file(f) for f in listed}
    patients = {role: {x["patient"] for x in prov if x["role"] == role and "/site/" in x["path"]} for role in files}
    assert not patients["adapt"] & patients["audit"] and not patients["calibration"] & patients["audit"]
    # the card says which sample, split and targets; claims.json is measured on the audit part, out of sample
    site = card["site"]
    assert site["sample"] == str(sample) and site["targets"]["flagged"] == 0.05 and site["targets"]["sensitivity"] == 0.8
    assert {k: site["split"]["parts"][k]["films"] for k in ("adapt", "calibrate", "audit")} == {
        k: len(v) for k, v in zip(("adapt", "calibrate", "audit"), files.values())}
    assert site["split"]["set_aside"] == len(listed)
    claims = Claims.load(model_dir / "claims.json")
    assert claims.model_sha256 == card["sha256"] and len(claims.claims) == 1
    claim = claims.claims[0]
    assert not claim.in_sample and claim.films == len(files["audit"]) and claim.threshold == card["calibration"]["threshold"]
    for f in ("1/model.onnx", "1/model.py", "config.pbtxt", "configs/cpu.pbtxt", "eligibility.json", "reference.json",
              "adapt_kit.npz", "MODEL_CARD.md", "claims.json"):
        assert (model_dir / f).is_file(), f
    # the threshold aimed above the site's sensitivity target (what the audit part's bound needs), and says so
    cal = card["calibration"]
    assert cal["sensitivity_target"] == 0.8 and cal["target"] > 0.8
    assert f"sensitivity aim {cal['target']:.3f} for the target 0.8" in (model_dir / "MODEL_CARD.md").read_text()
    films = sorted(str(p) for p in (sample / "PNEUMONIA").iterdir())[:6]
    with PneumoniaClient(str(out), protocol="embedded", model="pneumonia_site") as c:
        local = c.predict(films)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(ServerConfig(model_repository=out, http_port=http, grpc_port=grpc, metrics_port=metrics))
    server.start()
    try:
        with PneumoniaClient(server.config.grpc_url, protocol="grpc", model="pneumonia_site") as c:
            assert c.info.sha256 == card["sha256"] and c.info.threshold == pytest.approx(card["calibration"]["threshold"])
            served = c.predict(films)
    finally:
        server.stop()
    for a, b in zip(local, served):
        assert a.status == b.status and a.label == b.label
        assert (a.probability is None and b.probability is None) or a.probability == pytest.approx(b.probability, abs=1e-5)
    # a second attempt with another seed: it lists the first, draws the same audit patients, and is recorded
    r = cxr("adapt", str(sample), "--out-repository", str(out), "--name", "pneumonia_site2", "--report",
            str(tmp_path / "report"), "--targets", "flagged=0.05", "sensitivity=0.8", "--seed", "1",
            "--features", "head")
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "earlier attempt on this sample" in r.stdout
    second = json.loads((tmp_path / "report" / "adapt.json").read_text())
    first_audit = {p for p, part in card["adaptation"]["split"]["by_patient"].items() if part == "audit"}
    assert {p for p, part in second["split"]["by_patient"].items() if part == "audit"} == first_audit
    assert second["split"]["by_patient"] != card["adaptation"]["split"]["by_patient"]  # the seed drew the rest
    assert len(second["attempts"]) == 1 and "## Earlier attempts on this sample (1)" in (
        tmp_path / "report" / "audit.md").read_text()
    assert len((tmp_path / "report" / "attempts.jsonl").read_text().splitlines()) == 2


def test_the_audit_part_chooses_nothing(tmp_path: Path) -> None:
    """With the split fixed, flipping every label of the audit part changes the audit and nothing chosen: the
    weights and the OOD refit (the graph's sha256), the threshold and the sensitivity it aimed at."""
    from cxr.site.adapt import AdaptConfig, adapt
    from cxr.site.site_audit import Targets

    sample = variants(tmp_path / "a" / "site", per_film=30, seed=4, patient_per_variant=True)
    cfg = AdaptConfig(sample=sample, model_dir=SHIPPED_REPOSITORY / "pneumonia", out_repository=tmp_path / "repo",
                      name="a", report_dir=tmp_path / "r1", targets=Targets(flagged=0.1, sensitivity=0.7), confidence=0.9,
                      block_candidates=((2, 1e-3), (0, 1e-3)), block_epochs=3)  # the whole chain: augmented
    _, first = adapt(cfg, progress=False)
    by_patient = first["split"]["by_patient"]
    assert set(by_patient.values()) == {"adapt", "calibrate", "audit"}
    flipped = tmp_path / "b" / "site"  # the same folder name: the same patient ids
    shutil.copytree(sample, flipped)
    rows = []
    for s in data_mod.folder_samples(sample):
        cls = s.path.parent.name
        if by_patient[s.patient] == "audit":
            cls = "NORMAL" if cls == "PNEUMONIA" else "PNEUMONIA"
            shutil.move(str(flipped / s.path.parent.name / s.path.name), str(flipped / cls / s.path.name))
        rows.append({"label": cls, "file_name": s.path.name, "patient": s.patient.split(":", 1)[1]})
    data_mod.write_manifest(flipped, rows)
    again_cfg = AdaptConfig(**{**cfg.__dict__, "sample": flipped, "report_dir": tmp_path / "r2", "parts": by_patient})
    _, again = adapt(again_cfg, progress=False)
    assert again["split"]["by_patient"] == by_patient
    assert again["model_sha256"] == first["model_sha256"]
    assert again["calibration"]["threshold"] == first["calibration"]["threshold"]
    assert again["calibration"]["target"] == first["calibration"]["target"] > 0.7  # the aim: no audit label in it
    assert again["ood"]["threshold"] == first["ood"]["threshold"]
    assert again["features"]["tried"] == first["features"]["tried"]  # the block's fit and its choice, epoch by epoch
    assert first["audit"]["roc_auc"]["value"] > 0.9 > again["audit"]["roc_auc"]["value"]  # the audit saw the flip
    assert not again["audit"]["go"]
    # the terminal's summary of a no names the ranking the targets need (the adapt summary carries what it reads)
    from cxr.site.site_audit import summary
    assert again["audit"]["auc_targets_need"]["in_truth"] == pytest.approx(0.709, abs=0.001)  # 0.70 and 0.60
    assert "together need a ROC AUC of about 0.709" in summary(again["audit"])
    # at confidence 0.9 nothing is ever published, whatever the bounds say
    assert not first["audit"]["go"] and not first["audit"]["confidence_allows_go"]
    assert not (tmp_path / "repo" / "a").exists()


def test_adapt_refuses_a_sample_too_small_for_its_targets(tmp_path: Path) -> None:
    r = cxr("adapt", str(EXAMPLES), "--out-repository", str(tmp_path / "repo"), "--report", str(tmp_path / "r"))
    assert r.returncode == 2 and "needs" in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert not (tmp_path / "repo").exists()


def test_monitor_silent_on_a_like_batch_and_exit_3_on_a_rewindowed_one(tmp_path: Path) -> None:
    batches = {"baseline": variants(tmp_path / "a", per_film=8, seed=1), "like": variants(tmp_path / "b", per_film=8, seed=2),
               "rewindowed": variants(tmp_path / "c", per_film=8, seed=2, gamma=3.0)}
    csvs = {}
    for name, folder in batches.items():
        csvs[name] = tmp_path / f"{name}.csv"
        r = cxr("predict", str(folder), "--protocol", "embedded", "--format", "csv", "--out", str(csvs[name]))
        assert r.returncode == 0, r.stderr
    like = cxr("monitor", str(csvs["like"]), "--baseline", str(csvs["baseline"]), "--out", str(tmp_path / "like"))
    assert like.returncode == 0, like.stdout
    assert json.loads((tmp_path / "like.json").read_text())["moved"] == []
    shifted = cxr("monitor", str(csvs["rewindowed"]), "--baseline", str(csvs["baseline"]), "--out", str(tmp_path / "shift"))
    assert shifted.returncode == 3, shifted.stdout
    assert json.loads((tmp_path / "shift.json").read_text())["moved"]
    r = cxr("monitor", str(EXAMPLES / "MANIFEST.csv"))
    assert r.returncode == 2 and "not a predictions CSV" in r.stderr


def test_metrics_are_scraped_from_a_running_listener(tmp_path: Path) -> None:
    import pydicom
    from pynetdicom import AE

    from cxr.serving.server import free_ports
    from tests.test_pacs import echo

    port, mport = free_ports(2)
    log = open(tmp_path / "listen.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "cxr.cli", "listen", "--port", str(port), "--spool",
                             str(tmp_path / "spool"), "--out", str(tmp_path / "results.csv"), "--url",
                             str(SHIPPED_REPOSITORY), "--metrics-port", str(mport)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: echo(port), 90, "cxr listen to answer C-ECHO", proc=proc, log=tmp_path / "listen.log")
        ds = pydicom.dcmread(EXAMPLES / "dicom" / "chest_dx.dcm")
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
        assert assoc.is_established and assoc.send_c_store(ds).Status == 0
        assoc.release()
        results = tmp_path / "results.csv"
        wait_until(lambda: results.exists() and len(results.read_text().splitlines()) == 2)
        status = list(csv.DictReader(results.open()))[0]["status"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert f'cxr_screened_total{{model="pneumonia",status="{status}"}} 1.0' in text
        assert ('cxr_screened_by_device_total{manufacturer="ExampleVendor",model="pneumonia",station="EXAMPLE-DR1",'
                f'status="{status}"}} 1.0') in text
        assert 'cxr_ood_score_count{model="pneumonia"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_predict_writes_metrics_by_status_and_rule(tmp_path: Path) -> None:
    f = tmp_path / "m.prom"
    r = cxr("predict", str(EXAMPLES), "--protocol", "embedded", "--metrics-file", str(f))
    assert r.returncode == 0, r.stderr
    text = f.read_text()
    assert 'cxr_screened_total{model="pneumonia",status="ok"} 9.0' in text
    assert 'cxr_refused_total{model="pneumonia",rule="out_of_distribution"} 1.0' in text
    assert 'manufacturer="ExampleVendor"' in text
