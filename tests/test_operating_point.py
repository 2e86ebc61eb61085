"""The threshold that keeps its promise (Clopper-Pearson rule) and the ood_score head (fit, graph, threshold)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from scipy.stats import binomtest

from cxr.core import contract
from cxr.core.errors import CalibrationError, CxrError
from cxr.core.integrity import sha256_file
from cxr.core.ort_session import make_session
from cxr.export import ood_head
from cxr.train.evaluate import choose_threshold, operating_point, sensitivity_lower_bound
from tests.conftest import SHIPPED_MODELS, SHIPPED_REPOSITORY, cxr

ONNX = SHIPPED_REPOSITORY / "pneumonia" / "1" / "model.onnx"


@pytest.mark.parametrize(("k", "n"), [(130, 133), (133, 133), (50, 60), (1, 5)])
@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95])
def test_lower_bound_is_the_one_sided_clopper_pearson(k: int, n: int, confidence: float) -> None:
    expected = binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="exact").low
    assert sensitivity_lower_bound(k, n, confidence) == pytest.approx(expected, rel=1e-9)
    assert sensitivity_lower_bound(0, n, confidence) == 0.0


def test_lcb_rule_picks_the_highest_threshold_whose_bound_meets_the_target() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(133, int), np.zeros(78, int)]
    p = np.r_[rng.beta(6, 2, 133), rng.beta(2, 6, 78)]
    t = choose_threshold(y, p, rule="sensitivity_lcb", target=0.95, confidence=0.9)
    tp = int(((p >= t) & (y == 1)).sum())
    assert sensitivity_lower_bound(tp, 133, 0.9) >= 0.95
    # one positive fewer above the threshold would break the bound: no higher threshold qualifies
    higher = np.sort(p[(y == 1) & (p >= t)])[0]
    tp_higher = int(((p > higher) & (y == 1)).sum())
    assert sensitivity_lower_bound(tp_higher, 133, 0.9) < 0.95
    point = choose_threshold(y, p, rule="sensitivity", target=0.95)
    assert t <= point  # the bound asks for at least as many positives found as the point estimate


def test_lcb_rule_says_when_the_sample_is_too_small() -> None:
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    p = np.r_[np.full(20, 0.9), np.full(20, 0.1)]
    with pytest.raises(CalibrationError, match="cannot show sensitivity"):
        choose_threshold(y, p, rule="sensitivity_lcb", target=0.95, confidence=0.9)
    with pytest.raises(CalibrationError, match="confidence"):
        choose_threshold(y, p, rule="sensitivity_lcb", target=0.95, confidence=1.5)


def test_operating_point_reports_bounds() -> None:
    y = np.array([1, 1, 1, 0, 0])
    m = operating_point(y, np.array([0.9, 0.8, 0.2, 0.1, 0.7]), 0.5, confidence=0.9)
    assert (m["tp"], m["n_pos"], m["tn"], m["n_neg"]) == (2, 3, 1, 2)
    assert m["sensitivity_lower_bound"] == pytest.approx(sensitivity_lower_bound(2, 3, 0.9))


def test_the_shipped_points_are_chosen_on_their_populations_select_patients_and_served() -> None:
    from cxr.core.model_dir import ModelDir

    for model in SHIPPED_MODELS:
        folder = ModelDir(SHIPPED_REPOSITORY / model)
        card = folder.card()
        points = card.operating_points
        assert set(points) == {"pediatric", "adult"}
        assert points["pediatric"]["chosen_on"]["sources"] == ["kaggle_site"]
        assert points["adult"]["chosen_on"]["sources"] == ["siim", "nih"] and points["adult"]["chosen_on"]["each_source"]
        for pt in points.values():
            assert pt["chosen_on"]["side"] == "select"
            f = pt["select_figures_in_sample"]
            assert f["sensitivity"] >= pt["target"] and f["tp"] / f["n_pos"] == pytest.approx(f["sensitivity"])
        for source, f in points["adult"]["select_figures_in_sample_by_source"].items():  # the target on each source
            assert f["sensitivity"] >= points["adult"]["target"], (model, source)
        served = folder.served_params()
        assert dict(served.operating_points) == {k: v["threshold"] for k, v in points.items()}
        assert served.threshold_for(None) == (card.default_operating_point, card.threshold)
        # the card's calibration block describes the default point, in-sample on its select patients
        m = card.data["calibration"]["metrics"]
        assert m["sensitivity_lower_bound"] == pytest.approx(sensitivity_lower_bound(m["tp"], m["n_pos"], 0.9))
        md = (SHIPPED_REPOSITORY / model / "MODEL_CARD.md").read_text()
        assert "## Operating points" in md and all(f"{p['threshold']:.4f}" in md for p in points.values())


# -- the OOD head ------------------------------------------------------------------------------------------------

def test_threshold_keeps_the_pooled_pass_rate_and_each_sets_rate() -> None:
    rng = np.random.default_rng(0)
    sets = {"validation_a": rng.normal(10, 2, 786), "validation_b": rng.normal(11, 2, 211),
            "validation_small": np.r_[rng.normal(10, 2, 78), 40.0]}  # 79 films, one far outlier
    sets["train_validation"] = np.concatenate([sets["validation_a"], sets["validation_small"]])  # a union: counted once
    thr = ood_head.choose_threshold(sets)
    pooled = np.concatenate([sets[k] for k in ("validation_a", "validation_b", "validation_small")])
    assert np.mean(pooled <= thr) >= ood_head.PASS_RATE
    assert all(np.mean(s <= thr) >= ood_head.PER_SET_PASS_RATE for s in sets.values())
    assert thr < 40.0  # one outlier in a small set does not set the threshold for every input
    below = np.nextafter(np.float32(thr), np.float32(-np.inf))
    assert np.mean(pooled <= below) < ood_head.PASS_RATE or any(
        np.mean(s <= below) < ood_head.PER_SET_PASS_RATE for s in sets.values())  # the smallest such threshold


def _hospitals(rng: np.random.Generator, p: int = 60) -> tuple[np.ndarray, list[str], list[str]]:
    """Features of three hospitals: two large, one small (40 patients); each hospital has its own offset and each
    patient its own deviation, in more dimensions than the small hospital has patients."""
    x, src, pat = [], [], []
    for name, n, shift in (("big", 600, 0.0), ("other", 400, 0.5), ("small", 40, 1.5)):
        centre = rng.normal(0, shift, p)
        for i in range(n):
            x.append(centre + rng.normal(0, 1, p))
            src.append(name)
            pat.append(f"{name}{i}")
    return np.array(x), src, pat


def test_unseen_films_are_scored_by_fits_that_did_not_see_them() -> None:
    rng = np.random.default_rng(1)
    x, src, pat = _hospitals(rng)
    srcs = np.array(src)
    w = np.array([1 / (3 * (srcs == s).sum()) for s in src])  # equal mass per source, as refit_ood weighs
    mean, cov = ood_head.moments(x, w)
    fit = ood_head.shrink(mean, cov, x[:50], (), n_train=len(x))
    seen = fit.distance(x)
    unseen = {u.name: u for u in ood_head.unseen_scores(x, src, pat, fit.shrinkage)}
    assert set(unseen) == {f"{k}_{s}" for k in ("new_patients", "new_hospital") for s in ("big", "other", "small")}
    assert unseen["new_hospital_small"].pass_rate == ood_head.NEW_HOSPITAL_PASS_RATE
    assert unseen["new_patients_small"].pass_rate == ood_head.PER_SET_PASS_RATE
    small = srcs == "small"
    # a small source's films sit close to the fit that saw them; new patients of it lie further out, and a new
    # hospital further still: the fit's own distances understate what the next films score
    assert np.median(unseen["new_patients_small"].distances) > 1.1 * np.median(seen[small])
    assert np.median(unseen["new_hospital_small"].distances) > np.median(unseen["new_patients_small"].distances)
    # a new patient's distance is the one from the fit on the other folds: the same film scored twice agrees
    again = {u.name: u for u in ood_head.unseen_scores(x, src, pat, fit.shrinkage)}
    assert np.array_equal(again["new_patients_small"].distances, unseen["new_patients_small"].distances)
    # a patient's films share one fold: duplicating every film of one patient leaves its distance unseen
    xd = np.vstack([x, x[small][:1]])
    dup = {u.name: u for u in ood_head.unseen_scores(xd, [*src, "small"], [*pat, pat[int(np.flatnonzero(small)[0])]],
                                                      fit.shrinkage)}
    first, copy = dup["new_patients_small"].distances[0], dup["new_patients_small"].distances[-1]
    assert first == pytest.approx(copy) and first > 1e-6  # not scored by a fit that held its twin


def test_threshold_keeps_each_unseen_set_at_its_own_rate_and_pools_none() -> None:
    rng = np.random.default_rng(2)
    sets = {"validation_a": rng.normal(10, 1, 500)}
    far = rng.normal(14, 1, 100)
    thr_seen = ood_head.choose_threshold(sets)
    thr = ood_head.choose_threshold(sets, unseen={"new_hospital_b": (far, ood_head.NEW_HOSPITAL_PASS_RATE)})
    assert thr > thr_seen
    assert np.mean(far <= thr) >= ood_head.NEW_HOSPITAL_PASS_RATE
    below = np.nextafter(np.float32(thr), np.float32(-np.inf))
    assert np.mean(far <= below) < ood_head.NEW_HOSPITAL_PASS_RATE  # the smallest such threshold: not pooled
    with pytest.raises(CxrError, match="no scores for new_patients_c"):
        ood_head.choose_threshold(sets, unseen={"new_patients_c": (np.array([]), 0.98)})


def test_shipped_model_has_both_outputs_and_its_head_is_replaceable() -> None:
    model = onnx.load(str(ONNX))
    assert [o.name for o in model.graph.output] == list(contract.OUTPUT_NAMES)
    base = ood_head.strip(model)
    assert [o.name for o in base.graph.output] == [contract.OUTPUT_NAME]
    assert not any(n.name.startswith(ood_head.PREFIX) for n in base.graph.node)
    taps = ood_head.find_taps(base)
    assert len(taps) == 2 and "gap" in taps[0]


def test_graph_score_equals_the_float64_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Fit a head on random features of the shipped base graph, attach it, and compare the served value."""
    base = ood_head.strip(onnx.load(str(ONNX)))
    taps = ood_head.find_taps(base)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, *contract.IMAGE_SHAPE), dtype=np.uint8)
    fx = ood_head.FeatureExtractor(base, taps)
    feats = fx(x)
    fit = ood_head.fit(feats[:48], feats[48:], taps)
    model = ood_head.attach(base, fit)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    got = make_session(path).run([contract.OOD_OUTPUT_NAME], {contract.INPUT_NAME: x})[0]
    assert got.shape == (64, 1) and got.dtype == np.float32
    ref = fit.score(feats)
    np.testing.assert_allclose(got[:, 0], ref, rtol=ood_head.OOD_RTOL)
    prob_before = make_session(ONNX).run([contract.OUTPUT_NAME], {contract.INPUT_NAME: x})[0]
    prob_after = make_session(path).run([contract.OUTPUT_NAME], {contract.INPUT_NAME: x})[0]
    np.testing.assert_array_equal(prob_before, prob_after)  # the head never touches the probability


def test_fit_refuses_too_few_images() -> None:
    with pytest.raises(CxrError, match="too few"):
        ood_head.fit(np.zeros((5, 3)), np.zeros((5, 3)), ("t",))


def test_card_sha_and_ood_threshold_match_the_file() -> None:
    for model in SHIPPED_MODELS:
        card = json.loads((SHIPPED_REPOSITORY / model / "model_card.json").read_text())
        assert card["sha256"] == sha256_file(SHIPPED_REPOSITORY / model / card["file"])
        ood = card["ood"]
        assert all(v <= 1 - ood["per_set_pass_rate"] for v in ood["flagged"].values())  # each set
        n = ood["n"]
        parts = ood_head.disjoint(ood["flagged"])
        pooled = sum(ood["flagged"][k] * n[k] for k in parts) / sum(n[k] for k in parts)
        assert pooled <= 1 - ood["pass_rate_target"] + 1e-9  # all held-out real films, pooled
        # the training films scored by fits that did not see them: new patients and a new hospital per source
        assert {u["kind"] for u in ood["unseen"].values()} == {"new_patients", "new_hospital"}
        assert all(u["flagged"] <= 1 - u["pass_rate"] + 1e-9 for u in ood["unseen"].values())
        assert ood["parity_max_rel_diff"] <= ood_head.OOD_RTOL


def test_calibrate_refuses_a_model_with_operating_points_before_any_work(tmp_path: Path) -> None:
    """`cxr calibrate` sets one threshold; on a model that answers at operating points it says so in one line,
    names the commands that do set them, and writes nothing (the site folder is never even read)."""
    import shutil

    model = tmp_path / "repo" / "pneumonia"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", model, ignore=shutil.ignore_patterns("__pycache__"))
    before = {str(p): p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()}
    r = cxr("calibrate", "--model", str(model), "--data", str(tmp_path / "no_such_site"), "--overwrite", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (TensorFlow's own start-up lines may come before it)
    assert last.startswith("cxr calibrate: error: ") and "operating points (adult, pediatric)" in last, last
    assert "cxr operating-points" in last
    assert {str(p): p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()} == before


# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


# guards cxr.train.evaluate: sensitivity_lower_bound: its argument checks and the n-of-n value
def test_the_sensitivity_bound_refuses_what_it_cannot_bound() -> None:
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {confidence}$"):
            sensitivity_lower_bound(1, 2, confidence)
    for tp, n_pos in ((0, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match=rf"^need 0 <= tp <= n_pos and n_pos >= 1, got tp={tp}, n_pos={n_pos}$"):
            sensitivity_lower_bound(tp, n_pos, 0.9)
    # one positive, found: the one-sided 90% bound is exactly 0.1 (0.1 ** (1 / n) for n of n)
    assert sensitivity_lower_bound(1, 1, 0.9) == pytest.approx(0.1)
    assert sensitivity_lower_bound(0, 1, 0.9) == 0.0


# guards cxr.train.evaluate: choose_threshold: its CalibrationError messages
def test_the_threshold_rule_refuses_targets_and_confidences_out_of_range() -> None:
    y, p = np.array([0, 1, 1]), np.array([0.1, 0.5, 0.9])
    for target in (0.0, 1.5):
        with pytest.raises(CalibrationError, match=rf"^target must be in \(0, 1\], got {target}$"):
            choose_threshold(y, p, rule="sensitivity", target=target)
    for confidence in (0.0, 1.0):
        with pytest.raises(CalibrationError, match=rf"^confidence must be in \(0, 1\), got {confidence}$"):
            choose_threshold(y, p, rule="sensitivity_lcb", target=0.5, confidence=confidence)
    with pytest.raises(CalibrationError, match=r"^unknown rule 'best'$"):
        choose_threshold(y, p, rule="best")
    with pytest.raises(CalibrationError, match=r"use a larger sample or a lower confidence$"):
        choose_threshold(y, p, rule="sensitivity_lcb", target=0.99)


# guards cxr.train.evaluate: choose_threshold: the default target and confidence
def test_the_threshold_rule_defaults_to_95_percent_at_90_percent_confidence() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(300, int), np.zeros(300, int)]
    p = np.clip(np.r_[rng.normal(0.7, 0.15, 300), rng.normal(0.3, 0.15, 300)], 0, 1)
    assert choose_threshold(y, p, rule="sensitivity_lcb") == \
        choose_threshold(y, p, rule="sensitivity_lcb", target=0.95, confidence=0.9)


# guards cxr.train.evaluate: choose_threshold: >= (a bound equal to the target meets it)
def test_a_bound_that_exactly_meets_the_target_is_enough() -> None:
    """``>=``: with every one of 5 positives found the bound is 0.1 ** (1/5); that target is met, not missed."""
    y, p = np.array([0, 1, 1, 1, 1, 1]), np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.9])
    target = sensitivity_lower_bound(5, 5, 0.9)
    assert choose_threshold(y, p, rule="sensitivity_lcb", target=target, confidence=0.9) == pytest.approx(0.3)


# guards cxr.train.evaluate: choose_threshold: where between scores the threshold lies
def test_the_threshold_lies_midway_to_the_next_lower_score_or_on_the_lowest() -> None:
    assert choose_threshold([0, 0, 1, 1], [0.2, 0.4, 0.6, 0.8], rule="sensitivity", target=1.0) == pytest.approx(0.5)
    # the lowest score chosen: nothing below it, the threshold is that score
    assert choose_threshold([1, 0, 1], [0.1, 0.5, 0.9], rule="sensitivity", target=1.0) == pytest.approx(0.1)
    # a threshold of 1 would refer nothing: it is kept just below 1
    assert choose_threshold([1, 0], [1.0, 1.0], rule="sensitivity", target=1.0) == 1 - 1e-6


# guards cxr.train.evaluate: operating_point: its counts and bounds, one-class samples included
def test_the_operating_point_counts_and_bounds() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.2, 0.7, 0.3, 0.1, 0.05])
    op = operating_point(y, p, 0.5)
    assert op["confidence"] == 0.9
    assert (op["tp"], op["n_pos"], op["tn"], op["n_neg"]) == (2, 3, 3, 4)
    assert op["sensitivity_lower_bound"] == pytest.approx(sensitivity_lower_bound(2, 3, 0.9))
    assert op["specificity_lower_bound"] == pytest.approx(sensitivity_lower_bound(3, 4, 0.9))
    only_neg = operating_point(np.zeros(3, int), np.array([0.1, 0.2, 0.9]), 0.5)
    assert math.isnan(only_neg["sensitivity_lower_bound"]) and only_neg["tn"] == 2
    only_pos = operating_point(np.ones(3, int), np.array([0.1, 0.6, 0.9]), 0.5)
    assert math.isnan(only_pos["specificity_lower_bound"]) and only_pos["tp"] == 2



@pytest.mark.parametrize("model", SHIPPED_MODELS)
def test_ood_eval_compares_scores_every_shipped_architecture_has(model: str) -> None:
    """`cxr ood-eval` crashed on the accurate model: its comparison of scores assumed the compact CNN's two taps
    and dense layer. Each shipped graph now gets the scores it has, the served one among them."""
    from cxr.export.ood_eval import score_candidates

    base = ood_head.strip(onnx.load(str(SHIPPED_REPOSITORY / model / "1" / "model.onnx")))
    candidates = score_candidates(base)
    served = [taps for name, (taps, kind) in candidates.items() if name.endswith("(served)")]
    assert served == [tuple(ood_head.find_taps(base))] and "feature norm (GAP, low = OOD)" in candidates
    names = {t for taps, _ in candidates.values() for t in taps}
    outputs = {o for n in base.graph.node for o in n.output}
    assert names <= outputs  # every tapped tensor is in the graph


def test_unseen_training_films_the_body_part_check_refuses_count_as_refused_while_the_rate_can_hold() -> None:
    d = np.arange(1.0, 101.0)  # 100 training films' distances
    u = ood_head.Unseen("new_patients", "kaggle", d, 0.98)
    one = np.zeros(100, bool)
    one[0] = True  # the body-part check refuses one film: the two checks together keep 98%
    counted = ood_head._counting_refused(u, one)
    assert np.isinf(counted.distances[0]) and ood_head._keep(counted.distances, 0.98) == 99.0  # 98 of 100 kept
    many = np.zeros(100, bool)
    many[:5] = True  # it refuses 5%: no distance threshold keeps 98%, so the distance is held to 98% on its own
    assert ood_head._counting_refused(u, many) is u and ood_head._keep(d, 0.98) == 98.0
