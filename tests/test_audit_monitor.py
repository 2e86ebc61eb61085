"""The site audit's go/no-go arithmetic, the drift monitor's decisions, and the ONNX head round trip."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cxr.client import monitor
from cxr.core import contract
from cxr.core.errors import DataError
from cxr.core.model_dir import ModelCard
from cxr.train import audit
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
        assert rows[0] == {"status": OK, "probability": 0.25, "ood_score": 12.5} and rows[1]["probability"] is None
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
