"""Operating points chosen on select patients, and claims measured on test patients (``cxr operating-points``,
``cxr claims``).

A locked split (``cxr lock-split``) gives every source's patients one role. Here:

* :func:`choose_points` scores the **select** side with the served graph (the model's own ``ood_score`` refusals
  included) and chooses one threshold per population, each on its own population's select patients, by a stated
  rule. The card records each point with its rule, its sources and its select-side figures (in-sample for the
  threshold, and labelled so); the configs serve them as ``operating_points``.
* :func:`measure_claims` reads the **test** side once, scores it with the served graph, and writes
  ``claims.json`` (:class:`cxr.core.claims.Claims`): every source at every operating point, intervals from the
  patient bootstrap (:mod:`cxr.train.claims`). Nothing it measures feeds back into a choice. The test films are
  recorded in ``provenance.csv`` with the role ``test``.

The table the README and ``MODEL_CARD.md`` carry is rendered by :mod:`cxr.export.claims_render`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.claims import CLAIMS_FILE, Claim, Claims
from cxr.core.errors import CxrError
from cxr.core.model_dir import PROVENANCE_FILE, ModelDir
from cxr.core.paths import relative

logger = logging.getLogger(__name__)

RULES = ("sensitivity", "sensitivity_lcb", "youden")


@dataclass(frozen=True)
class PointRule:
    """How one named operating point is chosen.

    Attributes:
        name: The point's name (also the population it serves: ``pediatric``, ``adult``).
        sources: Select-side sources it is chosen on (its population's).
        rule: ``sensitivity`` (highest threshold whose select sensitivity reaches ``target``),
            ``sensitivity_lcb`` (its one-sided 90% lower bound reaches ``target``) or ``youden``.
        target: The sensitivity target (unused by ``youden``).
        each: The rule holds on each source's select films separately (the lowest of their thresholds), not on
            the sources pooled: a large source cannot carry a small one below the target.
    """

    name: str
    sources: tuple[str, ...]
    rule: str = "sensitivity"
    target: float = 0.9
    each: bool = False

    def __post_init__(self) -> None:
        if self.name not in ("pediatric", "adult") and not self.name.isidentifier():
            raise ValueError(f"operating point name {self.name!r}")
        if not self.sources:
            raise ValueError(f"operating point {self.name}: name the select-side sources it is chosen on")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if not 0.5 <= self.target < 1.0:
            raise ValueError(f"target must be in [0.5, 1), got {self.target}")

    @classmethod
    def parse(cls, text: str) -> PointRule:
        """``NAME=SOURCE[+SOURCE...]:RULE[:TARGET]`` (``adult=nih:sensitivity:0.9``; ``+`` pools the sources) or
        ``NAME=SOURCE,SOURCE...:RULE[:TARGET]`` (``,``: the rule holds on each source)."""
        name, sep, rest = text.partition("=")
        parts = rest.split(":")
        if not sep or len(parts) not in (2, 3) or not parts[0] or ("+" in parts[0] and "," in parts[0]):
            raise CxrError(f"--point {text!r}: expected NAME=SOURCE[+SOURCE|,SOURCE]:RULE[:TARGET]")
        each = "," in parts[0]
        try:
            return cls(name, tuple(parts[0].replace(",", "+").split("+")), parts[1],
                       float(parts[2]) if len(parts) == 3 else 0.9, each)
        except ValueError as exc:
            raise CxrError(f"--point {text!r}: {exc}") from None


@dataclass(frozen=True)
class Scored:
    """One side of a split scored by the served graph: labels, probabilities (NaN where refused), patients, sources."""

    y: np.ndarray
    p: np.ndarray
    patients: tuple[str, ...]
    sources: tuple[str, ...]
    paths: tuple[str, ...]

    def of(self, sources: tuple[str, ...] | str) -> Scored:
        names = (sources,) if isinstance(sources, str) else sources
        m = np.array([s in names for s in self.sources])
        idx = np.flatnonzero(m)
        return Scored(self.y[idx], self.p[idx], tuple(self.patients[i] for i in idx),
                      tuple(self.sources[i] for i in idx), tuple(self.paths[i] for i in idx))


def score_side(model_dir: Path, split_file: Path, side: str, *, cache_dir: Path | None = None) -> Scored:
    """Every film of one side through the product's path: decoding and pixel rules, then the served graph's
    ``probability`` and ``ood_score`` (a refusal is NaN)."""
    from cxr.core.ort_session import served_outputs
    from cxr.export.repository import read_card, verified_onnx
    from cxr.train import data as data_mod

    split = data_mod.Split.load(split_file)
    if not split.locked:
        raise CxrError(f"{split_file}: not a locked split (no test side); make one with `cxr lock-split`")
    samples = split.samples(side)
    card = read_card(Path(model_dir))
    path = verified_onnx(Path(model_dir), card)
    x, kept, _ = data_mod.load_assessable([s.path for s in samples], cache_dir=cache_dir)
    p = np.full(len(samples), np.nan)
    if len(kept):
        prob, ood = served_outputs(path, x)
        thr = card.ood_threshold
        answered = np.array([not contract.is_out_of_distribution(float(o), thr) for o in ood], bool)
        p[np.array(kept)[answered]] = np.asarray(prob, float)[answered]
    return Scored(np.array([s.label for s in samples], int), p, tuple(s.patient for s in samples),
                  tuple(s.source for s in samples), tuple(relative(s.path) for s in samples))


def choose_points(model_dirs: list[Path], split_file: Path, rules: list[PointRule], *, default: str | None = None,
                  cache_dir: Path | None = None, command: str = "") -> dict:
    """Choose each point on its population's select patients (scored by the first model) and store the points in
    every model folder given (card and configs). The default point is ``default``, else the most sensitive one
    (the lowest threshold): an input of unknown population is never screened less sensitively."""
    from cxr.export.repository import read_card, save_card, write_configs
    from cxr.train.evaluate import choose_threshold, operating_point

    if len({r.name for r in rules}) != len(rules):
        raise CxrError("one rule per operating point")
    scored = score_side(model_dirs[0], split_file, "select", cache_dir=cache_dir)
    points: dict[str, dict] = {}
    figures: dict[str, dict] = {}
    for r in rules:
        missing = set(r.sources) - set(scored.sources)
        if missing:
            raise CxrError(f"operating point {r.name}: no select films of {sorted(missing)} in {split_file}")
        s = scored.of(r.sources)
        ok = np.isfinite(s.p)
        if len(set(s.y[ok].tolist())) < 2:
            raise CxrError(f"operating point {r.name}: its select films need both classes")
        keys = ("sensitivity", "specificity", "roc_auc", "tp", "n_pos", "tn", "n_neg")
        per_source: dict[str, dict] = {}
        if r.each:
            thresholds = []
            for source in r.sources:
                one = s.of(source)
                one_ok = np.isfinite(one.p)
                if len(set(one.y[one_ok].tolist())) < 2:
                    raise CxrError(f"operating point {r.name}: the select films of {source} need both classes")
                thresholds.append(choose_threshold(one.y[one_ok], one.p[one_ok], rule=r.rule, target=r.target))
            thr = min(thresholds)
            for source in r.sources:
                one = s.of(source)
                one_ok = np.isfinite(one.p)
                f = operating_point(one.y[one_ok], one.p[one_ok], thr)
                per_source[source] = {k: f[k] for k in keys}
        else:
            thr = choose_threshold(s.y[ok], s.p[ok], rule=r.rule, target=r.target)
        fig = operating_point(s.y[ok], s.p[ok], thr)
        figures[r.name] = fig
        points[r.name] = {
            "threshold": thr, "population": r.name, "rule": r.rule, "target": r.target if r.rule != "youden" else None,
            "chosen_on": {"split": relative(split_file), "side": "select", "sources": list(r.sources),
                          "each_source": r.each, "films": int(len(s.y)), "answered": int(ok.sum()),
                          "patients": len(set(s.patients))},
            "select_figures_in_sample": {k: fig[k] for k in keys},
        }
        if per_source:
            points[r.name]["select_figures_in_sample_by_source"] = per_source
    default = default or min(points, key=lambda k: points[k]["threshold"])
    if default not in points:
        raise CxrError(f"default operating point {default!r} is not one of {sorted(points)}")
    for d in model_dirs:
        card = read_card(Path(d))
        pt = points[default]
        calibration = {**card.calibration, "threshold": pt["threshold"],
                       "rule": f"operating point {default}: {pt['rule']}", "target": pt["target"],
                       "confidence": figures[default]["confidence"] if pt["rule"] == "sensitivity_lcb" else None,
                       "fitted_on": f"select side of {relative(split_file)}, sources "
                       f"{'+'.join(pt['chosen_on']['sources'])}", "n_images": pt["chosen_on"]["answered"],
                       "metrics": figures[default]}
        card = card.replace(operating_points=points, default_operating_point=default, calibration=calibration)
        card = save_card(Path(d), card.with_command(command, once=True))
        write_configs(Path(d), card)
    return {"default": default, "points": points}


def measure_claims(model_dir: Path, split_file: Path, populations: dict[str, str], *, cache_dir: Path | None = None,
                   command: str = "", n_boot: int = 2000) -> Claims:
    """Read the test side once and write ``claims.json``: every source at every operating point of the model.

    Args:
        populations: source -> population (``kaggle_site`` -> ``pediatric``); every test source must have one.
    """
    from cxr.export.repository import read_card, save_card
    from cxr.train import claims as claims_mod
    from cxr.train import data as data_mod

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    points = {k: float(v["threshold"]) for k, v in card.operating_points.items()}
    if not points:
        points = {contract.SINGLE_OPERATING_POINT: card.threshold}
    scored = score_side(model_dir, split_file, "test", cache_dir=cache_dir)
    unknown = sorted(set(scored.sources) - set(populations))
    if unknown:
        raise CxrError(f"test sources {unknown} have no population (--population SOURCE=POPULATION)")
    out: list[Claim] = []
    for source in sorted(set(scored.sources)):
        s = scored.of(source)
        for name, thr in sorted(points.items()):
            out.append(claims_mod.measure(source=source, population=populations[source], operating_point=name,
                                          threshold=thr, y=s.y, p=s.p, patients=s.patients, in_sample=False,
                                          n_boot=n_boot))
    import datetime as dt

    earlier: tuple = ()
    if (model_dir / CLAIMS_FILE).exists():
        before = Claims.load(model_dir / CLAIMS_FILE)
        earlier = before.test_reads or ({"when": "unrecorded (before test reads were recorded)",
                                         "model_sha256": before.model_sha256, "split": "unrecorded",
                                         "command": before.generated_by},)
        logger.warning("%s: the test side was read before (%d time(s)); this read is recorded beside them",
                       model_dir / CLAIMS_FILE, len(earlier))
    read = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model_sha256": card.sha256,
            "split": relative(split_file), "command": command}
    claims = Claims(tuple(out), card.sha256, f"patient bootstrap ({n_boot} resamples, patients drawn within "
                    "class strata), each rate's interval widened to cover the exact Clopper-Pearson interval over its patients; "
                    "refused films count as referrals and as flagged; AUC over answered films",
                    generated_by=command, test_reads=(*earlier, read))
    claims.save(model_dir / CLAIMS_FILE)
    split = data_mod.Split.load(split_file)
    folder = ModelDir(model_dir)
    folder.write_provenance(data_mod.provenance_rows("test", split.samples("test")), replace_roles=("test",))
    card = card.replace(
        claims={"file": CLAIMS_FILE, "split": relative(split_file), "side": "test",
                "populations": dict(sorted(populations.items()))},
        provenance={"file": PROVENANCE_FILE, "summary": data_mod.provenance_summary(folder.provenance())})
    save_card(model_dir, card.with_command(command, once=True))
    return claims
