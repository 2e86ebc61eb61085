"""The site audit's go/no-go arithmetic, the drift monitor's decisions, and the ONNX head round trip."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cxr.core import contract
from cxr.core.errors import CxrError, DataError
from cxr.core.model_dir import ModelCard
from cxr.site import monitor
from cxr.site import site_audit as audit
from tests.conftest import REPO, SHIPPED_REPOSITORY

EXAMPLES = REPO / "examples"

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


def test_monitor_a_prevalence_is_the_share_of_pneumonia_judged_with_the_claims_at_each_rows_point() -> None:
    """Issue 33: --prevalence meant the share answered positive, at the card's default threshold. Now it is the
    share of Pneumonia, and the expected positive rate is prevalence x sensitivity + (1 - prevalence) x
    (1 - specificity) from the claims at the operating point each row was answered at, with its threshold."""
    from cxr.core.claims import Claims

    claims = Claims.load(SHIPPED_REPOSITORY / "pneumonia" / "claims.json")
    exp = monitor.expected_positive_rates(claims, 0.3)
    adult = next(c for c in claims.claims if c.operating_point == "adult" and c.population == "adult"
                 and c.sensitivity is not None and c.specificity is not None)
    assert set(exp) == {"adult", "pediatric"} and exp["adult"][0] == adult.threshold
    nih = monitor.expected_positive_rates(claims, 0.3, source="nih")["adult"]
    c = claims.find("nih", "adult")
    assert c is not None and c.sensitivity is not None and c.specificity is not None
    assert nih[1] == pytest.approx(0.3 * c.sensitivity.point + 0.7 * (1 - c.specificity.point))
    with pytest.raises(CxrError, match="give --baseline"):
        monitor.expected_positive_rates(claims, 0.3, source="nowhere")
    # each row at its own point: an adult row at the adult threshold and a pediatric row at its own
    e = monitor.Expectations(rates={}, positive={"adult": (0.13, 0.4), "pediatric": (0.27, 0.2)}, distributions={},
                             what="claims")
    rule = monitor.SequentialRule()
    row = {"status": OK, "probability": 0.2, "ood_score": 1.0, "threshold": 0.13, "operating_point": "adult"}
    v = monitor._film_values(row, e, 0.5, None, rule)["positive_rate"]
    assert v[2:] == (1.0, 0.4)  # positive at its own threshold 0.13, not at the card's 0.5
    v = monitor._film_values(row | {"threshold": 0.27, "operating_point": "pediatric"}, e, 0.5, None, rule)
    assert v["positive_rate"][2:] == (0.0, 0.2)
    assert "positive_rate" not in monitor._film_values(row | {"threshold": 0.5}, e, 0.5, None, rule)  # not the point's


def _mix(rng: np.random.Generator, n: int, prevalence: float, *, sep: float = 1.0, flagged: float = 0.01) -> list[dict]:
    """A site's answers: positives' logits N(sep, 1), negatives' N(-sep, 1) (ROC AUC about 0.92 at sep 1)."""
    rows = []
    for _ in range(n):
        if rng.random() < flagged:
            rows.append({"status": NA, "probability": None, "ood_score": float(rng.gamma(9, 7.5)),
                         "rule": "out_of_distribution"})
            continue
        z = rng.normal(sep, 1) if rng.random() < prevalence else rng.normal(-sep, 1)
        rows.append({"status": OK, "probability": float(1 / (1 + np.exp(-z))), "ood_score": float(rng.gamma(9, 2.5)),
                     "rule": None})
    return rows


def _state(baseline: list[dict]) -> monitor.MonitorState:
    exp = monitor.expectations_from_baseline(baseline, what="half", threshold=0.5, rules=monitor.header_rules())
    return monitor.MonitorState("ab" * 32, exp)


def test_monitor_a_doubled_prevalence_alarms_within_500_films_and_a_like_half_does_not() -> None:
    """Baseline: 800 films at 15% Pneumonia. Over ten draws, a batch of 500 at 30% alarms in at least eight (the
    CUSUM names what moved and since when), a like batch of 800 at 15% in at most one, and one odd batch (40
    films at 30%) followed by 400 ordinary films in none. (Issue 33: the old rule needed an absolute change of
    0.15 of the positive rate and missed 15% -> 30%.)"""
    rules = monitor.header_rules()
    doubled, like, odd = 0, 0, 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        st = _state(_mix(rng, 800, 0.15))
        d = monitor.observe(st, _mix(rng, 500, 0.30), batch="doubled", threshold=0.5, rules=rules)
        if d.alarms:
            doubled += 1
            a = d.alarms[0]
            assert a.direction == "up" and a.series in ("positive_rate", "high_probability", "probability")
            assert a.observed > a.expected and a.since_batch == "doubled" and 1 <= a.since_film <= a.at_film <= 500
            assert a.series in a.text() and "since film" in a.text()
        like += bool(monitor.observe(st, _mix(rng, 800, 0.15), batch="like", threshold=0.5, rules=rules).alarms)
        o = monitor.observe(st, _mix(rng, 40, 0.30), batch="odd", threshold=0.5, rules=rules)
        odd += bool(monitor.observe(o, _mix(rng, 400, 0.15), batch="after", threshold=0.5, rules=rules).alarms)
    assert doubled >= 8 and like <= 1 and odd <= 1, (doubled, like, odd)
    # across batches: the evidence of two halves of the doubled batch adds up
    rng = np.random.default_rng(0)
    st = _state(_mix(rng, 800, 0.15))
    first = monitor.observe(st, _mix(rng, 250, 0.30), batch="a", threshold=0.5, rules=rules)
    both = monitor.observe(first, _mix(rng, 250, 0.30), batch="b", threshold=0.5, rules=rules)
    assert both.films == 500 and both.alarms and [b for b, _ in both.batches] == ["a", "b"]
    assert max(s["up"].total for s in (first.sides or {}).values()) > 0


def test_monitor_a_long_like_stream_rarely_alarms() -> None:
    """Left on: five streams of 3,000 films like the 800-film baseline raise at most one alarm in all."""
    rules = monitor.header_rules()
    alarms = 0
    for seed in range(100, 105):
        rng = np.random.default_rng(seed)
        st = _state(_mix(rng, 800, 0.15))
        alarms += len(monitor.observe(st, _mix(rng, 3000, 0.15), batch="long", threshold=0.5, rules=rules).alarms)
    assert alarms <= 1


def _chest_variants(dest: Path, n: int, *, seed: int, gamma: float | None = None) -> list[Path]:
    """Films made from the example chest X-rays (small, so the test is fast): crop, rotation and a window around
    1 (``gamma`` instead: a new scanner's window)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    srcs = sorted((EXAMPLES / "NORMAL").glob("*.jpeg")) + sorted((EXAMPLES / "PNEUMONIA").glob("*.jpeg"))
    bases = [Image.open(p).convert("L").resize((256, 256)) for p in srcs]
    dest.mkdir(parents=True)
    out = []
    for i in range(n):
        img = bases[i % len(bases)]
        c = rng.uniform(0.85, 1.0)
        left, top = rng.uniform(0, 1 - c) * 256, rng.uniform(0, 1 - c) * 256
        img = img.crop((int(left), int(top), int(left + c * 256), int(top + c * 256))).rotate(rng.uniform(-4, 4))
        a = np.asarray(img, np.float64) / 255
        a = a ** (gamma if gamma is not None else rng.uniform(0.9, 1.1))
        path = dest / f"f{i:03d}.png"
        Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(path)
        out.append(path)
    return out


def test_monitor_image_statistics_alarm_on_a_new_scanners_gamma(tmp_path: Path) -> None:
    """Issue 33: gamma 1.6 on half the films moved specificity from 0.50 to 0.36 and nothing alarmed. Beside the
    answers, the monitor follows the films' intensity histogram, contrast and sharpness: a like batch stays
    quiet, the same films at gamma 1.6 alarm on the intensity, and say so."""
    rules = monitor.header_rules()
    rng = np.random.default_rng(21)

    def rows(paths: list[Path]) -> list[dict]:
        return [r | {"path": str(p)} for r, p in zip(_mix(rng, len(paths), 0.3, flagged=0.0), paths)]

    base = rows(_chest_variants(tmp_path / "base", 120, seed=1))
    exp = monitor.expectations_from_baseline(base, what="half", threshold=0.5, rules=rules, images=True)
    assert set(monitor.IMAGE_STATS) <= set(exp.distributions)
    st = monitor.MonitorState("ab" * 32, exp)
    like = monitor.observe(st, rows(_chest_variants(tmp_path / "like", 120, seed=2)), batch="like", threshold=0.5,
                           rules=rules, images=True)
    assert not like.alarms, [a.text() for a in like.alarms]
    new = monitor.observe(st, rows(_chest_variants(tmp_path / "gamma", 120, seed=2, gamma=1.6)), batch="gamma",
                          threshold=0.5, rules=rules, images=True)
    moved = {(a.series, a.direction) for a in new.alarms}
    assert ("intensity_mean", "down") in moved, moved
    a = next(a for a in new.alarms if a.series == "intensity_mean")
    assert a.relative < -0.1 and a.at_film <= 60 and a.since_batch == "gamma"
    s = monitor.image_stats(tmp_path / "base" / "f000.png")
    assert s is not None and set(s) == set(monitor.IMAGE_STATS) and 0 < s["intensity_mean"] < 1
    assert monitor.image_stats(tmp_path / "missing.png") is None


def test_monitor_without_a_baseline_never_judges_ood_or_flagged_against_the_pooled_reference(tmp_path: Path) -> None:
    """Issue 33: without --baseline, withheld adult NIH films alarmed on ood_score against the select side (79%
    children) in 96.5% of 30-film batches. The model's pooled reference is now shown, never judged."""
    from cxr.site.monitor import MonitorOptions

    repo = _monitor_repository(tmp_path / "repo")
    rows = _workload(np.random.default_rng(31), 300, 0.3)
    shifted = [r | {"ood_score": None if r["ood_score"] is None else r["ood_score"] * 3} for r in rows]
    batch = _write_csv(tmp_path / "b.csv", shifted, "bb" * 32)
    result, text = monitor.monitor(MonitorOptions(predictions=batch, repository=repo, model="high"))
    assert result["moved"] == [] and all(not c["judged"] for c in result["checks"]), result["checks"]
    assert "sequential" not in result and "shown, not judged" in text
    # against a baseline of the site's own films the same shift is judged and moves
    base = _write_csv(tmp_path / "w1.csv", _workload(np.random.default_rng(32), 300, 0.3), "bb" * 32)
    result, text = monitor.monitor(MonitorOptions(predictions=batch, repository=repo, model="high", baseline=base))
    assert "ood_score" in result["moved"] and "ood_score up" in result["moved"]
    assert "ALARM: ood_score up" in text


def test_monitor_keeps_its_state_follows_a_growing_csv_and_exports_prometheus(tmp_path: Path) -> None:
    import threading

    from cxr.site.monitor import MonitorOptions

    repo = _monitor_repository(tmp_path / "repo")
    base = _write_csv(tmp_path / "w1.csv", _workload(np.random.default_rng(41), 400, 0.3), "bb" * 32)
    state, metrics = tmp_path / "state.json", tmp_path / "cxr_monitor.prom"
    opts = MonitorOptions(predictions=tmp_path / "live.csv", repository=repo, model="high", baseline=base,
                          state=state, metrics=metrics)
    header = (tmp_path / "w1.csv").read_text().splitlines()[0] + "\n"
    (tmp_path / "live.csv").write_text(header)
    stop, seen = threading.Event(), threading.Event()
    films: list[int] = []

    def on_update(st: monitor.MonitorState) -> None:
        films.append(st.films)
        seen.set()

    t = threading.Thread(target=lambda: monitor.follow(opts, stop, poll_s=0.01, on_update=on_update), daemon=True)
    t.start()
    lines = _write_csv(tmp_path / "chunk.csv", _workload(np.random.default_rng(42), 60, 0.3), "bb" * 32
                       ).read_text().splitlines()[1:]
    with (tmp_path / "live.csv").open("a") as fh:
        fh.write("\n".join(lines[:30]) + "\n" + lines[30][:10])  # a torn last line waits for its end
        fh.flush()
    assert seen.wait(30)
    seen.clear()
    with (tmp_path / "live.csv").open("a") as fh:
        fh.write(lines[30][10:] + "\n" + "\n".join(lines[31:]) + "\n")
    assert seen.wait(30)
    stop.set()
    t.join(30)
    assert films[0] == 30 and films[-1] == 60
    kept = monitor.MonitorState.load(state)
    assert kept.films == 60 and kept.model_sha256 == "bb" * 32
    prom = metrics.read_text()
    assert 'cxr_monitor_films_total{model="high"} 60' in prom and 'series="high_probability"' in prom
    assert 'cxr_monitor_alarm{model="high"} 0' in prom
    # the next batch through the command continues the same state
    nxt = _write_csv(tmp_path / "b2.csv", _workload(np.random.default_rng(43), 50, 0.3), "bb" * 32)
    result, _ = monitor.monitor(replace(opts, predictions=nxt))
    assert result["sequential"]["films"] == 110 and monitor.MonitorState.load(state).films == 110


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


def _source_reference_folder(root: Path, rng: np.random.Generator) -> Path:
    """A model folder whose reference.json holds one hospital's select films by class (``by_source``) beside a
    pooled part unlike it (children: lower ood_score, more positives), and the shipped CPU model's claims."""
    import shutil

    d = root / "site"
    d.mkdir(parents=True)
    (d / "model_card.json").write_text(json.dumps({"model": "site", "sha256": "dd" * 32,
                                                   "calibration": {"threshold": 0.5}}))
    shutil.copy(SHIPPED_REPOSITORY / "pneumonia" / "claims.json", d / "claims.json")

    def films(n: int, centre: float, scale: float) -> dict:
        return {"n": n, "flagged_rate": 0.01, "probability": (1 / (1 + np.exp(-rng.normal(centre, 1, n)))).tolist(),
                "ood_score": rng.gamma(9, scale, n).tolist()}

    pooled = films(1200, 2.0, 1.5)
    (d / "reference.json").write_text(json.dumps({
        **pooled, "what": "pooled", "by_source": {"siim": {"Normal": films(400, -1.0, 2.5),
                                                           "Pneumonia": films(300, 1.0, 2.5)},
                                                  "nih": {"Normal": films(40, -1.0, 2.5),
                                                          "Pneumonia": films(13, 1.0, 2.5)}}}))
    return root


def test_source_reference_is_the_hospitals_films_mixed_at_the_prevalence() -> None:
    rng = np.random.default_rng(40)
    normal, pneumonia = rng.normal(0, 1, 400), rng.normal(3, 1, 300)
    ref = {"by_source": {"siim": {"Normal": {"n": 400, "flagged_rate": 0.02, "probability": normal.tolist(),
                                             "ood_score": normal.tolist()},
                                  "Pneumonia": {"n": 300, "flagged_rate": 0.0, "probability": pneumonia.tolist(),
                                                "ood_score": pneumonia.tolist()}}}}
    for prevalence in (0.1, 0.5):
        r = monitor.source_reference(ref, "siim", prevalence)
        assert r is not None and r["n"] == 700 and len(r["probability"]) == 700
        assert r["flagged_rate"] == pytest.approx((1 - prevalence) * 0.02)
        mixed = np.asarray(r["probability"])
        for cut in (0.5, 1.5, 2.5):  # the share above any cut is the mixture's
            want = (1 - prevalence) * np.mean(normal > cut) + prevalence * np.mean(pneumonia > cut)
            assert np.mean(mixed > cut) == pytest.approx(want, abs=2 / 700)
    assert monitor.source_reference(ref, "nih", 0.3) is None and monitor.source_reference(ref, None, 0.3) is None
    few = {"by_source": {"siim": {**ref["by_source"]["siim"], "Pneumonia": {
        "n": monitor.MIN_CLASS_FILMS - 1, "flagged_rate": 0.0, "probability": [0.9] * 19, "ood_score": [1.0] * 19}}}}
    assert monitor.source_reference(few, "siim", 0.3) is None  # too few films of a class to judge against


def test_monitor_at_a_prevalence_judges_ood_score_against_the_sites_hospital_only(tmp_path: Path) -> None:
    """Issue 33: ood_score and the flagged rate are judged only against a reference that matches the site's
    population. With --prevalence and --claims-source, the model's select films of that hospital, mixed at the
    prevalence, are that reference: the hospital's own films do not move anything there (they moved ood_score
    against the pooled films, which are not judged), and a scanner that shifts ood_score does."""
    rng = np.random.default_rng(41)
    repo = _source_reference_folder(tmp_path / "repo", rng)

    def batch(name: str, scale: float) -> Path:
        rows = _mix(rng, 600, 0.3)
        for r in rows:
            if r["status"] is OK:
                r["ood_score"] = float(rng.gamma(9, scale))
        return _write_csv(tmp_path / f"{name}.csv", rows, "dd" * 32)

    opts = monitor.MonitorOptions(predictions=batch("same", 2.5), repository=repo, model="site", prevalence=0.3,
                                  claims_source="siim")
    result, _ = monitor.monitor(opts)
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["ood_score"]["judged"] and checks["flagged_rate"]["judged"] and checks["probability"]["judged"]
    assert result["moved"] == [] and "siim's select films" in result["against"]
    shifted, _ = monitor.monitor(replace(opts, predictions=batch("scanner", 3.5), state=tmp_path / "state.json"))
    assert "ood_score" in shifted["moved"]
    # the sequential rule judges against the same reference: its alarm names ood_score going up
    assert shifted["sequential"]["alarms"][0]["series"] == "ood_score" and shifted["sequential"]["alarms"][0]["direction"] == "up"
    assert "siim's select films" in shifted["sequential"]["against"]
    # without the hospital, the pooled reference (children here) is shown, never judged
    pooled, _ = monitor.monitor(replace(opts, claims_source=None))
    assert not {c["name"]: c for c in pooled["checks"]}["ood_score"]["judged"] and pooled["moved"] == []
    # the same hospital's films against the pooled part would have moved: the test can fail
    assert {c["name"]: c for c in pooled["checks"]}["ood_score"]["p_value"] < 1e-6
    # too few films of a class (nih: 13 Pneumonia): the claims' positive rate only, as before
    nih, _ = monitor.monitor(replace(opts, claims_source="nih"))
    assert not {c["name"]: c for c in nih["checks"]}["ood_score"]["judged"]


def test_the_reference_a_refit_writes_holds_each_source_by_class(tmp_path: Path) -> None:
    """refit_ood's reference.json (save_reference with the select films' source and class) is what
    source_reference reads: the producer and the monitor agree on one layout."""
    from cxr.export.repository import save_reference

    rng = np.random.default_rng(42)
    groups = [("siim", 0)] * 30 + [("siim", 1)] * 25 + [("nih", 0)] * 5
    prob, ood = rng.random(70), rng.gamma(9, 2.5, 70)
    ood[0] = 1e6  # one refused Normal SIIM film
    ref = save_reference(tmp_path, prob, ood, 100.0, what="select", groups=groups)  # 10 site films after them
    assert json.loads((tmp_path / "reference.json").read_text()) == ref and ref["n"] == 70
    siim = ref["by_source"]["siim"]
    assert (siim["Normal"]["n"], siim["Pneumonia"]["n"], len(siim["Normal"]["probability"])) == (30, 25, 29)
    assert siim["Normal"]["flagged_rate"] == pytest.approx(1 / 30) and set(ref["by_source"]["nih"]) == {"Normal"}
    mixed = monitor.source_reference(ref, "siim", 0.5)
    assert mixed is not None and mixed["flagged_rate"] == pytest.approx(0.5 / 30) and mixed["n"] == 55
