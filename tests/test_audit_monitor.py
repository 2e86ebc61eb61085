"""The site audit's go/no-go arithmetic, the drift monitor's decisions, and the ONNX head round trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cxr.core import contract
from cxr.core.errors import DataError
from cxr.core.model_dir import ModelCard
from cxr.hospital import monitor
from cxr.hospital import site_audit as audit
from tests.conftest import SHIPPED_REPOSITORY

OK, NA = contract.Status.OK, contract.Status.NOT_ASSESSABLE


def _films(rng: np.random.Generator, n_pos: int, n_neg: int, *, sep: float, refused: int = 0) -> list[audit.Screened]:
    films = []
    for label, n in ((1, n_pos), (0, n_neg)):
        for i in range(n):
            p = float(1 / (1 + np.exp(-(rng.normal(sep if label else -sep, 1.0)))))
            films.append(audit.Screened(f"{label}_{i}.png", label, OK, p, 10.0))
    films += [audit.Screened(f"r{i}.png", 0, NA, None, 99.0, "out_of_distribution") for i in range(refused)]
    return films


def test_clopper_pearson_matches_scipy() -> None:
    from scipy.stats import binomtest

    for k, n in ((0, 10), (7, 10), (10, 10), (55, 61)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert audit.clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_a_good_sample_passes_and_a_bad_one_fails() -> None:
    rng = np.random.default_rng(0)
    good = audit.audit(_films(rng, 60, 200, sep=3.0), threshold=0.5, targets=audit.Targets())
    assert good["go"] and all(c["holds"] for c in good["checks"].values())
    bad = audit.audit(_films(rng, 60, 200, sep=0.2), threshold=0.5, targets=audit.Targets())
    assert not bad["go"] and not bad["checks"]["roc_auc"]["holds"]


def test_refused_films_are_referrals_and_count_against_the_flagged_target() -> None:
    rng = np.random.default_rng(1)
    films = _films(rng, 30, 100, sep=3.0, refused=10)
    r = audit.audit(films, threshold=0.5, targets=audit.Targets())
    # the 10 refused Normal films are referrals: specificity counts them as false positives
    tn = sum(1 for f in films if f.label == 0 and f.probability is not None and f.probability < 0.5)
    assert r["specificity"]["k"] == tn and r["specificity"]["n"] == 110
    assert r["flagged"]["k"] == 10 and not r["checks"]["flagged"]["holds"] and not r["go"]
    assert [x["path"] for x in r["refused"]] == [f"r{i}.png" for i in range(10)]
    assert r["roc_auc"]["n"] == 130  # AUC on the assessable films only


def test_targets_come_from_the_card_and_are_validated() -> None:
    card = ModelCard({"sha256": "ab" * 32, "calibration": {"threshold": 0.3},
                      "targets": {"sensitivity": 0.95, "flagged": 0.1, "unknown": 1}})
    t = audit.Targets.from_card(card)
    assert (t.sensitivity, t.specificity, t.flagged) == (0.95, 0.60, 0.1)
    with pytest.raises(ValueError, match="sensitivity"):
        audit.Targets(sensitivity=1.5)


def test_go_follows_the_bounds_not_the_point_estimates() -> None:
    rng = np.random.default_rng(21)
    # 30 positives with 28 found: the point estimate 0.933 meets 0.90, its 95% lower bound (0.80) does not
    films = _films(rng, 28, 200, sep=4.0)
    films += [audit.Screened(f"miss{i}.png", 1, OK, 0.01, 10.0) for i in range(2)]
    r = audit.audit(films, threshold=0.5, targets=audit.Targets())
    sens = r["checks"]["sensitivity"]
    assert sens["point_meets_target"] and sens["value"] == pytest.approx(28 / 30)
    assert sens["bound"] < 0.9 and not sens["holds"] and not r["go"]
    assert sens["bound"] <= audit.lower_bound(28, 30)  # never above the exact bound
    # the same rates on ten times the films: the bound now shows the target, and the decision is go
    big = _films(rng, 280, 400, sep=4.0) + [audit.Screened(f"m{i}.png", 1, OK, 0.01, 10.0) for i in range(20)]
    r = audit.audit(big, threshold=0.5, targets=audit.Targets())
    assert r["checks"]["sensitivity"]["bound"] >= 0.9 and r["go"], audit.summary(r)


def test_patients_widen_the_bound() -> None:
    """Ten films of each of three missed patients weigh more than thirty missed patients' films would."""
    rng = np.random.default_rng(22)
    base = _films(rng, 270, 300, sep=4.0)
    base = [audit.Screened(f.path, f.label, f.status, f.probability, f.ood_score, patient=f.path) for f in base]
    missed = [audit.Screened(f"m{i}.png", 1, OK, 0.01, 10.0, patient=f"p{i % 3}") for i in range(30)]
    alone = [audit.Screened(f.path, 1, OK, 0.01, 10.0, patient=f.path) for f in missed]
    grouped = audit.audit(base + missed, threshold=0.5, targets=audit.Targets())["checks"]["sensitivity"]["bound"]
    single = audit.audit(base + alone, threshold=0.5, targets=audit.Targets())["checks"]["sensitivity"]["bound"]
    assert grouped < single


def test_films_needed_and_samples_that_cannot_show_their_targets() -> None:
    t = audit.Targets()
    needs = audit.films_needed(t)
    # a perfect result on exactly that many films shows each target; one film fewer does not
    assert audit.lower_bound(needs.positives, needs.positives) >= 0.9 > audit.lower_bound(needs.positives - 1, needs.positives - 1)
    assert audit.lower_bound(needs.negatives, needs.negatives) >= 0.6 > audit.lower_bound(needs.negatives - 1, needs.negatives - 1)
    assert audit.upper_bound(0, needs.films) <= 0.02 < audit.upper_bound(0, needs.films - 1)
    assert (needs.positives, needs.negatives, needs.films) == (29, 6, 149)
    assert audit.films_needed(t, 0.9).positives < needs.positives
    with pytest.raises(audit.InsufficientSample, match=">= 29 Pneumonia"):
        audit.check_sample(5, 5, t)  # ten films
    with pytest.raises(audit.InsufficientSample, match="one class"):
        audit.check_sample(300, 0, t)
    assert audit.check_sample(100, 100, t) == needs


def _reference(rng: np.random.Generator, n: int = 800) -> dict:
    p = 1 / (1 + np.exp(-rng.normal(0, 2, n)))
    return {"n": n, "flagged_rate": 0.005, "probability": p.tolist(), "ood_score": rng.gamma(9, 2.5, n).tolist()}


def _rows(rng: np.random.Generator, n: int, *, shift: float = 0.0, flagged: float = 0.005, ood_scale: float = 2.5) -> list[dict]:
    rows = []
    for _ in range(n):
        if rng.random() < flagged:
            rows.append({"status": NA, "probability": None, "ood_score": 80.0})
        else:
            rows.append({"status": OK, "probability": float(1 / (1 + np.exp(-rng.normal(shift, 2)))),
                         "ood_score": float(rng.gamma(9, ood_scale))})
    return rows


def test_monitor_is_silent_on_a_batch_like_the_reference() -> None:
    rng = np.random.default_rng(2)
    ref = _reference(rng)
    for seed in range(5):
        checks = monitor.compare(_rows(np.random.default_rng(100 + seed), 400), ref, 0.5)
        assert not [c.name for c in checks if c.moved], checks


@pytest.mark.parametrize(("kwargs", "moved"), [
    ({"flagged": 0.15}, "flagged_rate"),
    ({"shift": 2.5}, "positive_rate"),
    ({"ood_scale": 4.0}, "ood_score"),
])
def test_monitor_names_what_moved(kwargs: dict, moved: str) -> None:
    rng = np.random.default_rng(3)
    checks = monitor.compare(_rows(np.random.default_rng(7), 400, **kwargs), _reference(rng), 0.5)
    assert moved in [c.name for c in checks if c.moved]


def test_monitor_report_too_small_batch_moves_nothing() -> None:
    rng = np.random.default_rng(4)
    checks = monitor.compare(_rows(rng, 10, flagged=0.9), _reference(rng), 0.5)
    result = monitor.report(checks, batch="b.csv", model="m", n_rows=10)
    assert result["too_small"] and result["moved"] == []


def test_monitor_reads_both_csv_column_orders_and_refuses_other_files(tmp_path: Path) -> None:
    from cxr.client.results import CSV_COLUMNS

    old = ["path", "label", "probability", "threshold", "model_name", "model_version", "error", "sha256",
           "sop_instance_uid", "status", "reason", "ood_score"]
    for cols in (old, list(CSV_COLUMNS)):
        f = tmp_path / "p.csv"
        with f.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerow({k: "" for k in cols} | {"status": "ok", "probability": "0.25", "ood_score": "12.5"})
            w.writerow({k: "" for k in cols} | {"status": "not_assessable", "ood_score": "90"})
        rows = monitor.read_predictions(f)
        assert rows[0] == {"status": OK, "probability": 0.25, "ood_score": 12.5, "rule": None, "model_sha256": None}
        assert rows[1]["probability"] is None
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a predictions CSV"):
        monitor.read_predictions(tmp_path / "x.csv")


def test_onnx_head_round_trip_matches_the_graph() -> None:
    """The head read from the served ONNX reproduces the graph's probability; weights written back are served."""
    import onnx

    from cxr.core.ort_session import make_session
    from cxr.export import head, ood_head

    model = onnx.load(str(SHIPPED_REPOSITORY / "pneumonia" / "1" / "model.onnx"))
    base = ood_head.strip(model)
    gap_tap = ood_head.find_taps(base)[0]
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (8, *contract.IMAGE_SHAPE), dtype=np.uint8)
    gap = ood_head.FeatureExtractor(base, (gap_tap,), log=False)(x)
    w = head.read(base, gap_tap)
    served = make_session(base.SerializeToString()).run([contract.OUTPUT_NAME], {contract.INPUT_NAME: x})[0][:, 0]
    assert w.probability(gap) == pytest.approx(served, abs=1e-5)
    w2 = head.HeadWeights(w.w1 * 0.5, w.b1 + 0.1, -w.w2, w.b2, w.scale, w.bias)
    changed = make_session(head.write(base, gap_tap, w2).SerializeToString()).run(
        [contract.OUTPUT_NAME], {contract.INPUT_NAME: x})[0][:, 0]
    assert w2.probability(gap) == pytest.approx(changed, abs=1e-5)
    assert np.abs(changed - served).max() > 1e-3


def _labelled_reference(rng: np.random.Generator, n_pos: int = 820, n_neg: int = 340) -> tuple[dict, np.ndarray, np.ndarray]:
    """A reference like the shipped one (about 71% answered positive at 0.5), and the probability laws of its
    positive and negative films."""
    pos = 1 / (1 + np.exp(-rng.normal(2.0, 1.0, n_pos)))
    neg = 1 / (1 + np.exp(-rng.normal(-2.0, 1.0, n_neg)))
    p = np.concatenate([pos, neg])
    return {"n": len(p), "flagged_rate": 0.005, "probability": p.tolist(),
            "ood_score": rng.gamma(9, 2.5, len(p)).tolist()}, pos, neg


def _workload(rng: np.random.Generator, n: int, prevalence: float, *, laterals: float = 0.0) -> list[dict]:
    rows = []
    for _ in range(n):
        if rng.random() < laterals:  # the lateral of a PA + lateral study, refused by its DICOM header
            rows.append({"status": NA, "probability": None, "ood_score": None, "rule": "dicom_view_position"})
            continue
        z = rng.normal(2.0, 1.0) if rng.random() < prevalence else rng.normal(-2.0, 1.0)
        rows.append({"status": OK, "probability": float(1 / (1 + np.exp(-z))), "ood_score": float(rng.gamma(9, 2.5)),
                     "rule": None})
    return rows


def test_monitor_a_pa_plus_lateral_workload_does_not_alarm() -> None:
    rng = np.random.default_rng(11)
    ref, _, _ = _labelled_reference(rng)
    rows = _workload(np.random.default_rng(12), 600, 0.71, laterals=0.5)
    checks = {c.name: c for c in monitor.compare(rows, ref, 0.5)}
    assert not [c for c in checks.values() if c.moved], checks
    assert checks["flagged_rate"].batch == 0.0 and checks["flagged_rate"].n_batch < 400  # laterals left out
    kept, refused = monitor.split_header_refusals(rows, monitor.header_rules())
    assert refused == {"dicom_view_position": 600 - len(kept)} and 200 < len(kept) < 400
    # had the laterals counted as refusals, the flagged rate would have alarmed: the test can fail
    as_pixels = [r | {"rule": "out_of_distribution"} if r["rule"] else r for r in rows]
    assert "flagged_rate" in [c.name for c in monitor.compare(as_pixels, ref, 0.5) if c.moved]
    result = monitor.report(list(checks.values()), batch="b", model="m", n_rows=len(kept), header_refused=refused)
    assert result["moved"] == [] and result["header_refused"] == refused
    assert "dicom_view_position" in monitor.markdown(result)


def test_monitor_a_prevalence_change_alone_does_not_alarm_at_the_stated_prevalence() -> None:
    rng = np.random.default_rng(13)
    ref, _, _ = _labelled_reference(rng)
    rows = _workload(np.random.default_rng(14), 800, 0.25)  # the same model and films, a site with 25% Pneumonia
    against_bare = [c.name for c in monitor.compare(rows, ref, 0.5) if c.moved]
    assert "positive_rate" in against_bare  # against the 71% reference the case mix alone alarms ...
    reweighted = monitor.at_prevalence(ref, 0.5, 0.25)
    assert np.mean(np.asarray(reweighted["probability"]) >= 0.5) == pytest.approx(0.25, abs=0.01)
    assert not [c.name for c in monitor.compare(rows, reweighted, 0.5) if c.moved]  # ... at 25% it does not
    # and a real shift is still seen at the stated prevalence
    shifted = [r | {"probability": min(1.0, r["probability"] + 0.45)} if r["probability"] is not None else r
               for r in rows]
    assert "positive_rate" in [c.name for c in monitor.compare(shifted, reweighted, 0.5) if c.moved]
    # without a baseline or a prevalence the case-mix checks are shown, never judged
    unjudged = {c.name: c for c in monitor.compare(rows, ref, 0.5, judge_case_mix=False)}
    assert not unjudged["positive_rate"].moved and not unjudged["positive_rate"].judged
    assert unjudged["flagged_rate"].judged


def _monitor_repository(root: Path) -> Path:
    rng = np.random.default_rng(15)
    ref, _, _ = _labelled_reference(rng)
    for name, sha, thr in (("low", "aa" * 32, 0.2), ("high", "bb" * 32, 0.8)):
        d = root / name
        d.mkdir(parents=True)
        (d / "model_card.json").write_text(json.dumps({"model": name, "sha256": sha, "calibration": {"threshold": thr}}))
        (d / "reference.json").write_text(json.dumps(ref))
    return root


def _write_csv(path: Path, rows: list[dict], sha: str) -> Path:
    from cxr.client.results import CSV_COLUMNS

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" for k in CSV_COLUMNS} | {
                "status": r["status"].value, "probability": "" if r["probability"] is None else repr(r["probability"]),
                "ood_score": "" if r["ood_score"] is None else repr(r["ood_score"]), "rule": r["rule"] or "",
                "model_sha256": sha})
    return path


def test_monitor_command_uses_the_threshold_of_the_model_the_csv_names(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from cxr import cli

    repo = _monitor_repository(tmp_path / "repo")
    rows = _workload(np.random.default_rng(16), 300, 0.3, laterals=0.3)
    batch = _write_csv(tmp_path / "b.csv", rows, "bb" * 32)
    baseline = _write_csv(tmp_path / "week1.csv", _workload(np.random.default_rng(17), 300, 0.3, laterals=0.1), "bb" * 32)
    rc = cli.main(["monitor", str(batch), "--model", "low", "--model-repository", str(repo), "--baseline", str(baseline),
                   "--out", str(tmp_path / "r")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "high" and result["threshold"] == 0.8  # the model that answered, not --model
    judged = [r["probability"] for r in rows if r["probability"] is not None]
    rate = next(c for c in result["checks"] if c["name"] == "positive_rate")
    assert rate["batch"] == pytest.approx(np.mean(np.array(judged) >= 0.8)) and rate["judged"]
    assert rc == 0 and result["moved"] == [] and result["header_refused"]["dicom_view_position"] > 50
    assert result["n"] == len(judged)
    capsys.readouterr()
    other = _write_csv(tmp_path / "c.csv", rows, "cc" * 32)
    assert cli.main(["monitor", str(other), "--model-repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cccccccccccc" in err
