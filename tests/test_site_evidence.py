"""Issue 33's rules for a site's evidence, on numbers (fast, no model): plans and checks count patients, go
means better than the model in service on the same patients, a confidence below 0.95 never goes, the patients
needed when the answer is no, and every attempt on a sample is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.core import contract, stats
from cxr.site import site_audit as audit_mod

OK = contract.Status.OK


def _films(scores: list[float], labels: list[int], patients: list[str] | None = None) -> list[audit_mod.Screened]:
    return [audit_mod.Screened(f"f{i}.png", y, OK, p, ood_score=1.0, patient=(patients[i] if patients else f"p{i}"))
            for i, (y, p) in enumerate(zip(labels, scores))]


def test_a_perfect_sample_of_two_films_a_patient_is_refused_by_its_patients() -> None:
    """Issue 33: a perfect 150-film sample with 2 films a patient passed the plan (films), then got NO-GO (the
    bounds count patients). The check now counts patients, so it is refused before anything is screened."""
    films = [audit_mod.Screened(f"f{i}.png", int(i < 60), OK, 0.5, patient=f"p{i // 2}") for i in range(160)]
    n_pos, n_neg, n_all = audit_mod.patients_by_class(films)
    assert (n_pos, n_neg, n_all) == (30, 50, 80)
    with pytest.raises(audit_mod.InsufficientSample, match=r"30 Pneumonia, 50 Normal patients, 80 in all.*"
                                                          r">= 149 patients in all"):
        audit_mod.check_sample(n_pos, n_neg, audit_mod.Targets(), n_all=n_all)
    one_each = [audit_mod.Screened(f"f{i}.png", int(i < 60), OK, 0.5, patient=f"p{i}") for i in range(160)]
    audit_mod.check_sample(*audit_mod.patients_by_class(one_each)[:2], audit_mod.Targets(), n_all=160)
    assert "Normal patients" in audit_mod.plan_text(audit_mod.Targets(), 0.95)
    assert "exploration only" in audit_mod.plan_text(audit_mod.Targets(), 0.9)
    assert "exploration" not in audit_mod.plan_text(audit_mod.Targets(), 0.95)


def test_a_confidence_below_095_never_goes_and_the_targets_that_applied_are_named() -> None:
    rng = np.random.default_rng(0)
    y = [1] * 60 + [0] * 100
    films = _films([0.9 + 0.05 * rng.random() if v else 0.05 * rng.random() for v in y], y)
    easy = audit_mod.Targets(sensitivity=0.5, specificity=0.5, roc_auc=0.5, flagged=0.2)
    assert audit_mod.audit(films, threshold=0.5, targets=easy, n_boot=50)["go"] is True
    low = audit_mod.audit(films, threshold=0.5, targets=easy, n_boot=50, confidence=0.9)
    assert all(c["holds"] for c in low["checks"].values()) and low["go"] is False
    assert low["confidence_allows_go"] is False and "below the 95%" in audit_mod.summary(low)
    assert audit_mod.targets_source(()) == "the card"
    assert audit_mod.targets_source(("sensitivity=0.95",)).startswith("the site (sensitivity=0.95")


def test_a_no_says_how_many_patients_per_class_would_do() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(40, int), np.zeros(40, int)]
    p = 1 / (1 + np.exp(-(1.8 * y - 0.9 + rng.normal(0, 1, 80))))
    r = audit_mod.audit(_films(p.tolist(), y.tolist()), threshold=0.5, n_boot=50,
                        targets=audit_mod.Targets(sensitivity=0.85, specificity=0.97, roc_auc=0.92, flagged=0.2))
    assert not r["go"]
    for name, n in r["needs_if_no"].items():
        ch = r["checks"][name]
        assert not ch["holds"]
        if name in ("sensitivity", "specificity") and n is not None:
            assert stats.lower_bound(ch["value"] * n, n) >= ch["target"] > stats.lower_bound(
                ch["value"] * (n - 1), n - 1)
        if ch["value"] <= ch["target"]:
            assert n is None  # no sample shows a figure the observation itself misses
    assert set(r["needs_if_no"]) == {"sensitivity", "specificity", "roc_auc"}  # the point misses specificity
    assert r["needs_if_no"]["specificity"] is None and r["needs_if_no"]["sensitivity"] > 40
    assert r["needs_if_no"]["roc_auc"] > r["roc_auc"]["n"]
    assert "patients needed if the figures held" in audit_mod.summary(r)


def _pair(site_p: np.ndarray, svc_p: np.ndarray, y: np.ndarray, thr: tuple[float, float] = (0.5, 0.5)) -> dict:
    site_f, svc_f = _films(site_p.tolist(), y.tolist()), _films(svc_p.tolist(), y.tolist())
    targets = audit_mod.Targets(sensitivity=0.5, specificity=0.3, roc_auc=0.6, flagged=0.2)
    site = audit_mod.audit(site_f, threshold=thr[0], targets=targets, n_boot=50)
    svc = audit_mod.audit(svc_f, threshold=thr[1], targets=targets, n_boot=50)
    cmp_ = audit_mod.compare_with_service(site, site_f, svc, svc_f, service_model="base")
    return audit_mod.decide(site, cmp_)


def test_go_means_better_than_the_model_in_service_on_the_same_patients() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(80, int), np.zeros(80, int)]
    noise = rng.normal(0, 1, 160)
    good = 1 / (1 + np.exp(-(3.0 * y - 1.5 + noise)))
    weak = 1 / (1 + np.exp(-(1.0 * y - 0.5 + noise + rng.normal(0, 1, 160))))
    better = _pair(good, weak, y)
    c = better["comparison"]
    assert c["auc_difference"]["lower"] > 0 and c["auc_difference"]["holds"]
    assert c["auc_difference"]["difference"] == pytest.approx(
        stats.paired_auc_difference(y, good, weak).difference)
    assert c["sensitivity_difference"]["holds"] and better["meets_targets"] and better["go"] is True
    # the same model as the one in service: not better, so no go although every target holds
    same = _pair(good, good, y)
    assert same["meets_targets"] and not same["comparison"]["auc_difference"]["holds"] and same["go"] is False
    assert same["comparison"]["needs_if_no"] == {"auc_difference": None}
    # better AUC but a lower sensitivity at the operating point: no go
    lower_sens = _pair(good, weak, y, thr=(0.9, 0.2))
    s = lower_sens["comparison"]["sensitivity_difference"]
    assert s["site_bound"] < s["service_bound"] and not s["holds"] and lower_sens["go"] is False
    md = audit_mod.markdown(lower_sens, title="t", model="m", sample="s")
    assert "Against the model in service (`base`)" in md and "| sensitivity_difference |" in md
    with pytest.raises(ValueError, match="same films"):
        audit_mod.compare_with_service(better, _films([0.5], [1]), better, _films([0.5, 0.2], [1, 0]),
                                       service_model="b")


def test_every_attempt_is_recorded_and_a_report_lists_the_earlier_ones(tmp_path: Path) -> None:
    from cxr.train import data as data_mod

    rows = []
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "s" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "s" / cls / f"{cls}{i}.png").write_bytes(f"{cls}{i}".encode())
            rows.append({"label": cls, "file_name": f"{cls}{i}.png", "patient": f"{cls}{i}"})
    data_mod.write_manifest(tmp_path / "s", rows)
    sample = audit_mod.site_sample(tmp_path / "s", [])
    sha = audit_mod.sample_sha256(sample)
    import shutil

    shutil.copytree(tmp_path / "s", tmp_path / "renamed")  # another folder name: the same sample
    assert audit_mod.sample_sha256(audit_mod.site_sample(tmp_path / "renamed", [])) == sha
    report = tmp_path / "report"
    assert audit_mod.earlier_attempts(report, sha) == []
    first = audit_mod.record_attempt(report, command="cxr adapt", sample="s", sample_sha=sha,
                                     options={"seed": 0, "targets": ()}, outcome="no-go", model_sha256="ab")
    audit_mod.record_attempt(report, command="cxr adapt", sample="other", sample_sha="0" * 64, options={},
                             outcome="go")
    audit_mod.record_attempt(report, command="cxr site-audit", sample="s", sample_sha=sha,
                             options={"confidence": 0.9}, outcome="insufficient")
    earlier = audit_mod.earlier_attempts(report, sha)
    assert [a["outcome"] for a in earlier] == ["no-go", "insufficient"] and earlier[0] == json.loads(
        json.dumps(first))
    assert earlier[0]["options"] == {"seed": 0, "targets": []}
    lines = (report / audit_mod.ATTEMPTS_FILE).read_text().splitlines()
    assert len(lines) == 3  # appended, never rewritten
    with pytest.raises(ValueError, match="outcome must be"):
        audit_mod.record_attempt(report, command="x", sample="s", sample_sha=sha, options={}, outcome="maybe")
    r = audit_mod.audit(_films([0.9, 0.1], [1, 0]), threshold=0.5, targets=audit_mod.Targets(), n_boot=10)
    r["attempts"] = earlier
    md = audit_mod.markdown(r, title="t", model="m", sample="s")
    assert "## Earlier attempts on this sample (2)" in md and "cxr site-audit" in md


def _samples(n_patients: int, films_each: int = 1, folder: str = "site") -> list:
    from cxr.train import data as data_mod

    return [data_mod.Sample(Path(f"/x/{folder}/{i}_{k}.png"), int(i % 3 == 0), f"{folder}:pt{i}", folder)
            for i in range(n_patients) for k in range(films_each)]


def test_the_audit_part_is_fixed_by_the_patient_ids_not_the_seed() -> None:
    from cxr.site.adapt import split_sample

    samples = _samples(300, films_each=2)
    a = split_sample(samples, set(), calibrate_fraction=0.3, audit_fraction=0.3, seed=0)
    b = split_sample(samples, set(), calibrate_fraction=0.3, audit_fraction=0.3, seed=7)
    audit_a, audit_b = ({s.patient for s in x["audit"]} for x in (a, b))
    assert audit_a == audit_b and len(audit_a) > 50
    assert {s.patient for s in a["calibrate"]} != {s.patient for s in b["calibrate"]}  # the seed draws the rest
    # a renamed folder (another namespace), a shuffled order: the same patients audit
    renamed = _samples(300, films_each=2, folder="other")[::-1]
    c = split_sample(renamed, set(), calibrate_fraction=0.3, audit_fraction=0.3, seed=3)
    assert {s.patient.split(":")[1] for s in c["audit"]} == {p.split(":")[1] for p in audit_a}
    # patients the model learned from never audit
    held = {next(iter(audit_a))}
    d = split_sample(samples, held, calibrate_fraction=0.3, audit_fraction=0.3, seed=0)
    assert not held & {s.patient for s in d["audit"]}


def test_the_service_point_is_the_populations_then_the_default() -> None:
    from cxr.core.model_dir import ModelDir
    from cxr.site.adapt import service_point
    from tests.conftest import SHIPPED_REPOSITORY

    card = ModelDir(SHIPPED_REPOSITORY / "pneumonia").card()
    assert service_point(card, "adult") == ("adult", card.operating_points["adult"]["threshold"])
    assert service_point(card, "pediatric")[0] == "pediatric"


def _model_folder(dest: Path, tag: str) -> Path:
    """A complete (servable) model folder: the shipped one's files with a marker."""
    import shutil

    from tests.conftest import SHIPPED_REPOSITORY

    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", dest, ignore=shutil.ignore_patterns("adapt_kit.npz"))
    (dest / "tag").write_text(tag)
    return dest


def _servable(folder: Path) -> bool:
    from cxr.export import repository

    card = repository.read_card(folder)
    return repository.verified_onnx(folder, card).is_file() and (folder / "config.pbtxt").is_file()


@pytest.mark.parametrize("exchange", [True, False])
def test_publishing_replaces_a_model_folder_in_one_step_or_recoverably(tmp_path: Path, monkeypatch,
                                                                       exchange: bool) -> None:
    """Issue 33: publishing was rmtree then rename, so a crash between them left no model where Triton looks.
    Now: an atomic exchange (renameat2) where the system has it, else old aside, new in, old deleted, with the
    old folder restored after a crash between the renames. A crash at every step leaves a servable folder."""
    import shutil

    from cxr.site import adapt as adapt_mod

    if not exchange:
        monkeypatch.setattr(adapt_mod, "_exchange", lambda a, b: False)
    elif not adapt_mod._exchange(tmp_path / "nope1", tmp_path / "nope2") and not _try_exchange(tmp_path):
        pytest.skip("this file system has no atomic exchange")
    dest = _model_folder(tmp_path / "repo" / "pneumonia_site", "old")

    def staged() -> Path:
        s = tmp_path / "repo" / ".pneumonia_site.staging" / "pneumonia_site"
        shutil.rmtree(s.parent, ignore_errors=True)
        return _model_folder(s, "new")

    # a crash at each step: every rename and the delete fail in turn
    real_rename, real_rmtree = Path.rename, shutil.rmtree
    steps = 0
    def crash_at(limit: int, calls: dict[str, int]):  # type: ignore[no-untyped-def]
        def wrap(fn):  # type: ignore[no-untyped-def]
            def inner(*a, **k):  # type: ignore[no-untyped-def]
                calls["n"] += 1
                if calls["n"] == limit:
                    raise OSError("crash")
                return fn(*a, **k)
            return inner
        return wrap

    while True:
        calls = {"n": 0}
        staging = staged()
        monkeypatch.setattr(Path, "rename", crash_at(steps + 1, calls)(real_rename))
        monkeypatch.setattr(shutil, "rmtree", crash_at(steps + 1, calls)(real_rmtree))
        try:
            adapt_mod.publish_folder(staging, dest)
            done = True
        except OSError:
            done = False
        monkeypatch.setattr(Path, "rename", real_rename)
        monkeypatch.setattr(shutil, "rmtree", real_rmtree)
        adapt_mod.recover_publish(dest)  # what the next publish does first
        assert _servable(dest), steps
        assert (dest / "tag").read_text() in ("old", "new")
        if done:
            break
        steps += 1
    assert (dest / "tag").read_text() == "new" and steps == (1 if exchange else 3)  # the crash points passed
    assert not (tmp_path / "repo" / ".pneumonia_site.old").exists()
    assert not (tmp_path / "repo" / ".pneumonia_site.staging").exists()


def _try_exchange(tmp_path: Path) -> bool:
    from cxr.site import adapt as adapt_mod

    (tmp_path / "x1").mkdir()
    (tmp_path / "x2").mkdir()
    return adapt_mod._exchange(tmp_path / "x1", tmp_path / "x2")


def test_the_calibrate_part_aims_where_the_audit_part_can_show_the_sensitivity_target(tmp_path: Path) -> None:
    from cxr.site.adapt import AdaptConfig, _aim, _calibrate_positives_needed, sensitivity_aim
    from cxr.train.data import Sample

    # 138 positive audit films (the SIIM walk-through's): a 95% bound of 0.90 needs 131 found, 0.80 needs 119
    aim = sensitivity_aim(138, 0.90, 0.95)
    assert aim is not None and round(aim * 138) == 131
    assert round(sensitivity_aim(138, 0.80, 0.95) * 138) == 119  # type: ignore[operator]
    k = round(aim * 138)
    assert stats.lower_bound(k, 138, 0.95) >= 0.90 > stats.lower_bound(k - 1, 138, 0.95)
    # more positives, a lower aim; too few for the target even with all found: no aim
    assert sensitivity_aim(1000, 0.90, 0.95) < aim  # type: ignore[operator]
    assert sensitivity_aim(20, 0.90, 0.95) is None
    # a threshold aimed at the target itself leaves the audit's bound below it in almost every draw (binomial draws
    # of 138 positives); aimed a little above the aim, in most draws it shows the target
    rng = np.random.default_rng(0)

    def shown(point: float) -> float:
        found = rng.binomial(138, point, 4000)
        return float(np.mean([stats.lower_bound(int(f), 138, 0.95) >= 0.90 for f in found]))

    assert shown(0.90) < 0.1 and shown(aim + 0.02) > 0.5
    # the aim reads the calibrate part only, scaled by the parts' fractions: an audit part is never passed to it
    cfg = AdaptConfig(sample=tmp_path, model_dir=tmp_path, out_repository=tmp_path, name="m", report_dir=tmp_path,
                      calibrate_fraction=0.3, audit_fraction=0.3)
    calibrate = [Sample(tmp_path / f"{i}.png", int(i < 138), patient=f"p{i}") for i in range(190)]
    assert _aim(cfg, audit_mod.Targets(), calibrate) == aim
    wider = AdaptConfig(**{**cfg.__dict__, "audit_fraction": 0.45})  # 207 audit positives expected: a lower aim
    assert _aim(wider, audit_mod.Targets(), calibrate) == sensitivity_aim(207, 0.90, 0.95) < aim  # type: ignore[operator]
    assert _aim(cfg, audit_mod.Targets(), calibrate[130:]) is None  # 8 positives: no aim
    # the calibrate positives a sample needs, and a target no sample can show: one line, exit 2
    need = _calibrate_positives_needed(cfg, 0.90)
    assert _aim(cfg, audit_mod.Targets(), [Sample(tmp_path / f"{i}.png", 1, f"p{i}") for i in range(need)]) is not None
    with pytest.raises(audit_mod.InsufficientSample, match="no sample can show sensitivity 1.0"):
        _calibrate_positives_needed(cfg, 1.0)
    with pytest.raises(audit_mod.InsufficientSample, match="no sample can show"):
        audit_mod.films_needed(audit_mod.Targets(sensitivity=1.0))


def test_a_no_says_what_ranking_the_sensitivity_and_specificity_targets_need() -> None:
    # the card's targets: 0.90 and 0.60 together need a binormal AUC of about 0.86 in truth; at the bounds of an audit
    # part with 138 Pneumonia and 55 Normal films (the SIIM walk-through's) the points must be 0.949 and 0.727: 0.94
    targets = audit_mod.Targets()
    need = audit_mod.auc_targets_need(targets, 138, 55)
    assert need["in_truth"] == pytest.approx(0.861, abs=0.001) and need["at_bounds"] == pytest.approx(0.944, abs=0.001)
    assert audit_mod.auc_targets_need(audit_mod.Targets(sensitivity=0.0))["in_truth"] is None
    assert audit_mod.auc_targets_need(targets, 10, 5)["bounds_need"] == "more films"  # 10 perfect films: bound 0.74
    assert audit_mod.auc_targets_need(targets, 29, 6)["bounds_need"] == "every film right"  # the plan's smallest
    assert "ROC AUC of about 0.86 or more" in audit_mod.plan_text(targets, 0.95)
    # a model at AUC 0.75: the audit's no names the ranking the two targets need beside the model's
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(150, int), np.zeros(150, int)]
    p = 1 / (1 + np.exp(-(0.95 * y + rng.normal(0, 1, 300))))
    res = audit_mod.audit(_films(list(p), list(y)), threshold=float(np.quantile(p, 0.2)), targets=targets)
    assert not res["go"] and res["auc_targets_need"]["at_bounds"] > res["auc_targets_need"]["in_truth"] > 0.86 - 1e-3
    line = f"this model reads {res['roc_auc']['value']:.3f}"
    assert line in audit_mod.summary(res) and line in audit_mod.markdown(res, title="t", model="m", sample="s")
    # targets that hold say nothing of it
    easy = audit_mod.audit(_films(list(p), list(y)), threshold=0.5, targets=audit_mod.Targets(
        sensitivity=0.2, specificity=0.2, roc_auc=0.5, flagged=0.5))
    assert "together need" not in audit_mod.summary(easy)
