"""``cxr adapt``: adapt the served model to a hospital from its own labelled films, offline, in minutes.

Steps (each one's figures go into the report and the new model card):

1. **Split** the sample by patient, stratified by class, into three parts: *adapt* (fits the weights),
   *calibrate* (sets the threshold and refits the OOD reference) and *audit* (judges the result and chooses
   nothing). Films whose sha256 the model's ``provenance.csv`` lists (it trained, selected or calibrated on
   them) are set aside and counted; their patients' other films go to the adapt part, never to calibrate or audit.
   A sample without patient ids gets a warning (patients are then guessed from file names).
   Before any work, the audit part must be able to show the targets (:func:`cxr.site.site_audit.check_sample`) and
   the calibrate part's positives must be able to set a threshold at the sensitivity aim (:func:`_aim`);
   otherwise exit 2 with the films per class needed.
2. **Fine-tune the classifier head** (``Dense(128)`` and the logit, read from and written back into the ONNX
   graph by :mod:`cxr.export.head`) on the adapt part, class-balanced, while distilling the shipped model's
   answers on the kit's replay set of training features from every source (so the first sites are not
   forgotten), with an L2 pull towards the shipped weights. The convolutional features stay as shipped.
3. **Refit the OOD reference** as a mixture of the shipped training moments and the site's adapt and calibrate
   parts (half the mass by default, ``site_mass``).
4. **Recalibrate** with the ``sensitivity_lcb`` rule on the calibrate part's assessable films, aimed at the
   sensitivity an audit part of the calibrate part's size needs to show the target at its bound (:func:`_aim`,
   :func:`sensitivity_aim`: with 138 Pneumonia films a 95% bound of 0.90 needs 131 found, 0.949), never at a lower
   target than the card's or the site's; the audit part's labels are not read for it.
   Aimed at the target itself, the threshold lands the audit's point near the target and its bound below it.
5. **Audit** the result on the audit part against the targets, on bounds (:func:`cxr.site.site_audit.audit`),
   and against the model in service on the same patients (:func:`cxr.site.site_audit.compare_with_service`:
   the paired AUC difference's one-sided bound above 0, a sensitivity bound not lower), at a confidence of at
   least 0.95; measure its :class:`cxr.core.claims.Claim` (patient bootstrap, ``in_sample`` false). Only a
   passing model is published (with ``claims.json``, by :func:`publish_folder`); a failing one exits 3 and
   leaves only its report.

The audit part is fixed by a hash of the patient ids (:func:`audit_patients`), and every run is appended to the
report folder's ``attempts.jsonl`` (:func:`cxr.site.site_audit.record_attempt`); the report and the
published card list the earlier attempts on the same sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError, DataError
from cxr.core.model_dir import ModelDir
from cxr.train import data as data_mod

if TYPE_CHECKING:
    from cxr.export.head import HeadWeights
    from cxr.export.ood_head import OodFit

logger = logging.getLogger(__name__)

#: The parts of the site sample, in the order they are drawn (audit first, from patients no set-aside film has).
PARTS = ("adapt", "calibrate", "audit")
#: One-sided confidence of the threshold rule on the calibrate part.
CALIBRATION_CONFIDENCE = 0.9


#: What ``--features`` may say: the head only; the head or the last convolutions (the default); or also the whole chain.
FEATURES = ("auto", "head", "whole")
#: The whole chain's candidate ``(convolutions, learning rate)``: 0 = every convolution, trained on augmented films.
WHOLE_CANDIDATE = (0, 3e-4)


@dataclass(frozen=True)
class AdaptConfig:
    """What ``cxr adapt`` does.

    Attributes:
        sample: The hospital's labelled films, ``{NORMAL,PNEUMONIA}/`` (optional ``MANIFEST.csv`` with patients).
        model_dir: The served model folder to adapt (``<repository>/<model>``).
        out_repository: Repository to publish the adapted model folder into.
        name: Name of the adapted model folder.
        report_dir: Where the adaptation report goes (published or not).
        calibrate_fraction: Share of the sample's films (by patient) for the calibrate part.
        audit_fraction: Share of the sample's films (by patient) kept for the audit.
        targets: Go-live targets (``None``: the card's).
        confidence: One-sided confidence of the audit's bounds.
        calibration_confidence: One-sided confidence of the threshold rule on the calibrate part.
        population: Who the site's films are (the claim's population).
        parts: A fixed split, patient -> part (patients as the sample names them, namespaced by the folder);
            ``None``: drawn with ``seed``.
        steps: Full-batch Adam steps of the head fine-tuning.
        learning_rate: Adam step size.
        replay_weight: Mass of the distillation term relative to the site's films.
        l2: Pull towards the shipped head's weights.
        site_mass: Share of the refitted OOD reference that is the site's films (the shipped sources share
            the rest). Half by default: after go-live the site's own films are the population the refusal rule
            must know best (measured: with the mass of one more source, a quarter, 2 of 86 NIH audit films were
            flagged; with half, 1).
        seed: Seed of the split (and of the block fine-tuning).
        features: ``auto``: also fine-tune the network's last convolutions (each of ``block_candidates``:
            (convolutions, learning rate); 0 = every convolution of the chain, from the normalised image on) with the
            head, and keep whichever of these and the head-only fit has the best ROC AUC on the calibrate part;
            ``head``: the head only; ``whole``: ``auto`` with :data:`WHOLE_CANDIDATE` added (not the default: on the
            SIIM sample it gained 0.009 audit AUC and cost the Kaggle site 0.044, docs/onboarding.md).
        block_epochs: Epochs of each block fine-tuning (the best epoch on the calibrate part is kept).
        augment: Augment the adapt films (small rotations, shifts, zooms) when a block starts at the image.
        block_l2: Pull of the block fine-tuning towards the base weights.
        distill: Weight of distillation towards the base model's answers on the site's adapt films in the block
            fine-tuning (0 by default: measured on the SIIM sample's calibrate part, 0.5 lowered the AUC from
            0.823 to 0.810; the L2 pull limits forgetting instead).
        replay_distill: Weight of distillation on the kit's replay activations of the training films, for the
            block whose input the kit carries (``adapt_kit.REPLAY_BLOCK_CONVS`` convolutions).
        adapt_limit: Use only this many films of the adapt part (a learning curve); ``None``: all.
        targets_from: Whose targets ``targets`` are (``the card``, or the site's own: written into the card, the
            claims and every report; :func:`cxr.site.site_audit.targets_source`).
    """

    sample: Path
    model_dir: Path
    out_repository: Path
    name: str
    report_dir: Path
    calibrate_fraction: float = 0.3
    audit_fraction: float = 0.3
    targets: object | None = None
    confidence: float = 0.95
    calibration_confidence: float = CALIBRATION_CONFIDENCE
    population: str = "adult"
    parts: Mapping[str, str] | None = field(default=None, repr=False)
    steps: int = 400
    learning_rate: float = 1e-3
    replay_weight: float = 1.0
    l2: float = 1e-3
    site_mass: float = 0.5
    seed: int = 0
    features: str = "auto"
    block_candidates: tuple[tuple[int, float], ...] = ((2, 3e-4), (4, 1e-4))
    block_epochs: int = 30
    augment: bool = True
    block_l2: float = 1e-4
    distill: float = 0.0
    replay_distill: float = 0.5
    adapt_limit: int | None = None
    targets_from: str = "the card"

    def __post_init__(self) -> None:
        if not 0.0 < self.site_mass < 1.0:
            raise ValueError(f"site_mass must be in (0, 1), got {self.site_mass}")
        for name in ("calibrate_fraction", "audit_fraction"):
            if not 0.1 <= getattr(self, name) <= 0.6:
                raise ValueError(f"{name} must be in [0.1, 0.6], got {getattr(self, name)}")
        if self.calibrate_fraction + self.audit_fraction > 0.8:
            raise ValueError("calibrate and audit fractions leave under 20% of the sample to adapt on")
        if not (0.5 < self.confidence < 1 and 0.5 < self.calibration_confidence < 1):
            raise ValueError("confidences must be in (0.5, 1)")
        if self.population not in ("adult", "pediatric"):
            raise ValueError(f"population must be adult or pediatric, got {self.population!r}")
        if self.parts is not None and not set(self.parts.values()) <= set(PARTS):
            raise ValueError(f"parts must map patients to {PARTS}")
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
        if self.block_epochs < 1 or self.block_l2 < 0 or self.distill < 0 or self.replay_distill < 0 or any(
                c < 0 or lr <= 0 for c, lr in self.block_candidates):
            raise ValueError("block_epochs >= 1, block_l2 >= 0, distill >= 0, candidates (convolutions >= 0, rate > 0)")
        if self.adapt_limit is not None and self.adapt_limit < 10:
            raise ValueError(f"adapt_limit must be at least 10 films, got {self.adapt_limit}")
        if self.steps < 1 or self.learning_rate <= 0 or self.replay_weight < 0 or self.l2 < 0:
            raise ValueError("steps >= 1, learning_rate > 0, replay_weight >= 0 and l2 >= 0 are needed")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"model name {self.name!r} is not a folder name")


def patient_rank(patient: str) -> str:
    """A patient's place in the audit draw: the sha256 of its bare id (the folder's namespace left out), so the
    audit part is fixed by the patients themselves: no seed, option or copy of the folder redraws it."""
    from cxr.site.site_audit import bare_patient

    return hashlib.sha256(bare_patient(patient).encode()).hexdigest()


def audit_patients(samples: list[data_mod.Sample], fraction: float, *, exclude: set[str]) -> set[str]:
    """The audit part's patients: class by class, in the order of :func:`patient_rank`, until their films reach
    ``fraction`` of the class's films (patients in ``exclude`` never; a patient of both classes once)."""
    return data_mod.take_patients(samples, fraction, lambda ps: sorted(ps, key=lambda p: (patient_rank(p), p)),
                                  exclude=exclude)


def split_sample(samples: list[data_mod.Sample], held: set[str], *, calibrate_fraction: float, audit_fraction: float,
                 seed: int, parts: Mapping[str, str] | None = None) -> dict[str, list[data_mod.Sample]]:
    """``{part: films}`` for :data:`PARTS`: by patient, stratified by class; patients in ``held`` (those with a
    film the model's provenance lists) only ever adapt. The audit part is fixed by a hash of the patient ids
    (:func:`audit_patients`: ``seed`` draws only the calibrate part from the rest). ``parts`` (patient -> part)
    fixes the whole split instead."""
    if parts is None:
        rng = random.Random(seed)
        audit = audit_patients(samples, audit_fraction, exclude=held)
        rest = [s for s in samples if s.patient not in audit]
        share = calibrate_fraction / (1.0 - audit_fraction)
        calibrate = data_mod.draw_patients(rest, share, rng, exclude=held)
        parts = {s.patient: "audit" if s.patient in audit else "calibrate" if s.patient in calibrate else "adapt"
                 for s in samples}
    else:
        missing = {s.patient for s in samples} - set(parts)
        if missing:
            raise DataError(f"the fixed split names no part for {len(missing)} patients (e.g. {sorted(missing)[0]})")
        if any(parts[p] != "adapt" for p in held):
            raise DataError("the fixed split puts a patient the model learned from outside the adapt part")
    return {part: [s for s in samples if parts[s.patient] == part] for part in PARTS}


def sensitivity_aim(n_pos: int, target: float, confidence: float) -> float | None:
    """The smallest share of ``n_pos`` positives found whose one-sided exact lower bound at ``confidence`` reaches
    ``target`` (:func:`cxr.core.stats.rate_to_show`): the sensitivity the threshold must give for an audit part
    with ``n_pos`` positive films to show the target (``None``: not even all of them found would). The calibrate
    part sets its threshold at this aim."""
    from cxr.core import stats

    return stats.rate_to_show(target, n_pos, confidence) if n_pos >= 1 else None


def _aim(cfg: AdaptConfig, targets, calibrate_part: list[data_mod.Sample]) -> float | None:
    """The calibrate part's sensitivity aim: what an audit part of the expected size (the calibrate part's Pneumonia
    films x ``audit_fraction / calibrate_fraction``; both parts are drawn by patient within each class) needs to
    show the target at its exact bound at the audit's confidence. Only the calibrate part is read: the audit part
    chooses nothing. With a fixed split (``parts``) the fractions may not describe it; the aim is then a rough one.
    The audit's bound is the more cautious of the exact one and the patient bootstrap's, so where patients have
    several films the aim can fall a little short. ``None``: no threshold can reach it."""
    n_audit = round(sum(s.label for s in calibrate_part) * cfg.audit_fraction / cfg.calibrate_fraction)
    aim = sensitivity_aim(n_audit, targets.sensitivity, cfg.confidence)
    return None if aim is None else max(aim, targets.sensitivity)


def _calibrate_positives_needed(cfg: AdaptConfig, target: float) -> int:
    """The fewest Pneumonia films of a calibrate part that can set a threshold at its aim (:func:`_aim`): more
    positives only lower the aim and raise what a perfect result shows, so the search doubles, then bisects.

    Raises:
        InsufficientSample: No sample can (a target of 1, say).
    """
    from cxr.site import site_audit as audit_mod

    def ok(n: int) -> bool:
        aim = sensitivity_aim(round(n * cfg.audit_fraction / cfg.calibrate_fraction), target, cfg.confidence)
        return aim is not None and supported_target(n, aim, cfg.calibration_confidence)

    try:
        return audit_mod._smallest_n(ok)
    except ValueError:
        raise audit_mod.InsufficientSample(f"no sample can show sensitivity {target} at its bound") from None


def supported_target(n_pos: int, target: float, confidence: float = CALIBRATION_CONFIDENCE) -> bool:
    """Whether ``n_pos`` positives can show sensitivity >= ``target`` at ``confidence``: the one-sided lower bound
    of a perfect result (every positive found) reaches it. (The rule then keeps as many misses as the bound allows;
    the target is the card's, never lowered to what a small sample supports.)"""
    from cxr.train.evaluate import sensitivity_lower_bound

    return n_pos >= 1 and sensitivity_lower_bound(n_pos, n_pos, confidence) >= target


def finetune_head(w0, gap_site: np.ndarray, y_site: np.ndarray, gap_replay: np.ndarray, teacher: np.ndarray,
                  *, steps: int, learning_rate: float, replay_weight: float, l2: float):
    """Full-batch Adam on the head: class-balanced log-loss on the site films, log-loss against the teacher's
    probabilities on the replay set (distillation), and ``l2 * |theta - theta0|^2``. Returns (weights, losses)."""
    from cxr.export.head import HeadWeights

    g = np.concatenate([gap_site, gap_replay])
    t = np.concatenate([y_site.astype(np.float64), teacher])
    w = np.zeros(len(g))
    for label in (0, 1):
        m = y_site == label
        if not m.any():
            raise DataError(f"the adapt part has no {contract.LABELS[label]} film")
        w[: len(y_site)][m] = 0.5 / m.sum()
    w[len(y_site):] = replay_weight / max(1, len(gap_replay))
    w /= w.sum()
    theta0 = {"w1": w0.w1, "b1": w0.b1, "w2": w0.w2, "b2": w0.b2}
    theta = {k: v.copy() for k, v in theta0.items()}
    m1 = {k: np.zeros_like(v) for k, v in theta.items()}
    m2 = {k: np.zeros_like(v) for k, v in theta.items()}
    losses = []
    for step in range(1, steps + 1):
        pre = g @ theta["w1"] + theta["b1"]
        h = np.maximum(pre, 0.0)
        z = (h @ theta["w2"] + theta["b2"])[:, 0]
        s = w0.scale * z + w0.bias
        q = 1.0 / (1.0 + np.exp(-s))
        eps = 1e-7
        loss = -np.sum(w * (t * np.log(q + eps) + (1 - t) * np.log(1 - q + eps)))
        loss += l2 * sum(float(np.sum((theta[k] - theta0[k]) ** 2)) for k in theta)
        losses.append(float(loss))
        dz = (w * w0.scale * (q - t))[:, None]
        grads = {"w2": h.T @ dz, "b2": dz.sum(axis=0)}
        dpre = (dz @ theta["w2"].T) * (pre > 0)
        grads["w1"], grads["b1"] = g.T @ dpre, dpre.sum(axis=0)
        for k in theta:
            grads[k] = grads[k] + 2 * l2 * (theta[k] - theta0[k])
            m1[k] = 0.9 * m1[k] + 0.1 * grads[k]
            m2[k] = 0.999 * m2[k] + 0.001 * grads[k] ** 2
            theta[k] -= learning_rate * (m1[k] / (1 - 0.9**step)) / (np.sqrt(m2[k] / (1 - 0.999**step)) + 1e-8)
    return HeadWeights(theta["w1"], theta["b1"], theta["w2"], theta["b2"], w0.scale, w0.bias), losses


def _part_counts(films: list[data_mod.Sample]) -> dict[str, int]:
    return {"films": len(films), "patients": len({s.patient for s in films}),
            "positives": sum(s.label == 1 for s in films), "negatives": sum(s.label == 0 for s in films)}


def _parts(cfg: AdaptConfig, site, targets) -> dict[str, list[data_mod.Sample]]:
    """The sample's three parts by patient (films the model's provenance lists set aside), refused with the films
    per class needed when a part cannot do its job (the audit part show the targets; the calibrate part set a
    threshold at the sensitivity aim, :func:`_aim`; the adapt part hold both classes)."""
    from cxr.site import site_audit as audit_mod

    held = {s.patient for s in site.set_aside}
    parts = split_sample(list(site.films), held, calibrate_fraction=cfg.calibrate_fraction,
                         audit_fraction=cfg.audit_fraction, seed=cfg.seed, parts=cfg.parts)
    if cfg.adapt_limit is not None and cfg.adapt_limit < len(parts["adapt"]):  # a learning curve: fewer patients
        keep = data_mod.draw_patients(parts["adapt"], cfg.adapt_limit / len(parts["adapt"]), random.Random(cfg.seed))
        parts["adapt"] = [s for s in parts["adapt"] if s.patient in keep]
    a_part, c_part, u_part = parts["adapt"], parts["calibrate"], parts["audit"]
    try:
        n_pos, n_neg, n_all = audit_mod.patients_by_class(u_part)
        audit_mod.check_sample(n_pos, n_neg, targets, cfg.confidence, n_all=n_all)
    except audit_mod.InsufficientSample as exc:
        needs = audit_mod.films_needed(targets, cfg.confidence)
        raise audit_mod.InsufficientSample(
            f"the audit part ({cfg.audit_fraction:.0%} of the sample's patients) cannot show the targets: {exc}; the "
            f"whole sample needs about {needs.positives / cfg.audit_fraction:.0f} Pneumonia, "
            f"{needs.negatives / cfg.audit_fraction:.0f} Normal and {needs.films / cfg.audit_fraction:.0f} patients in "
            "all") from None
    c_pos = sum(s.label for s in c_part)
    aim = _aim(cfg, targets, c_part)
    if aim is None or not supported_target(c_pos, aim, cfg.calibration_confidence) or c_pos == len(c_part):
        need = _calibrate_positives_needed(cfg, targets.sensitivity)
        raise audit_mod.InsufficientSample(
            f"the calibrate part has {c_pos} Pneumonia and {len(c_part) - c_pos} Normal films: a threshold at which "
            f"the audit part could show sensitivity >= {targets.sensitivity} at its {cfg.confidence:.0%} bound needs "
            f"both classes and >= {need} Pneumonia films (the whole sample about {need / cfg.calibrate_fraction:.0f} "
            "Pneumonia films)")
    if not {0, 1} <= {s.label for s in a_part}:
        raise audit_mod.InsufficientSample("the adapt part needs films of both classes; give a larger sample")
    return parts


@dataclass(frozen=True)
class _Decoded:
    """The sample's films decoded under the model's own rules, and their features under the shipped graph.

    ``x`` and ``feats`` have one row per film the pixel and DICOM rules accept (``row`` maps its path to the row);
    ``prepared`` holds every film's decoding (refusals included), indexed by ``index``."""

    samples: list[data_mod.Sample]
    prepared: list
    x: np.ndarray
    feats: np.ndarray
    gap: np.ndarray
    row: dict[Path, int]
    index: dict[Path, int]

    def rows_of(self, part: list[data_mod.Sample]) -> list[int]:
        return [self.row[s.path] for s in part if s.path in self.row]

    def labels(self, part: list[data_mod.Sample]) -> np.ndarray:
        return np.array([s.label for s in part if s.path in self.row])


def _decode(samples: list[data_mod.Sample], rules, base, kit, *, progress: bool) -> _Decoded:
    from tqdm import tqdm

    from cxr.client.client import prepare
    from cxr.export import ood_head

    prepared = [prepare(s.path, rules) for s in tqdm(samples, desc="decode", unit="film", disable=not progress)]
    ok_idx = [i for i, pr in enumerate(prepared) if pr.array is not None]
    arrays = [a for a in (prepared[i].array for i in ok_idx) if a is not None]
    x = np.stack(arrays) if arrays else np.zeros((0, *contract.IMAGE_SHAPE), np.uint8)
    feats = ood_head.FeatureExtractor(base, kit.taps, log=progress)(x) if len(x) else np.zeros((0, len(kit.ood_mean)))
    gap = np.expm1(feats[:, :kit.replay_gap.shape[1]])  # the first tap is the GAP, log1p-transformed
    return _Decoded(samples, prepared, x, feats, gap, {samples[i].path: k for k, i in enumerate(ok_idx)},
                    {s.path: i for i, s in enumerate(samples)})


@dataclass(frozen=True)
class _Weights:
    """What adapted: the new graph (head or block + head), the fitted head, and every candidate tried."""

    model: Any  # onnx.ModelProto
    head: HeadWeights
    losses: list[float]
    tried: list[dict]
    chosen: dict
    block_chosen: bool


def _fit_weights(cfg: AdaptConfig, base, kit, dec: _Decoded, a_part: list[data_mod.Sample],
                 c_part: list[data_mod.Sample], *, progress: bool) -> _Weights:
    """Fit on the adapt part: the head (with distillation on the kit's replay set), and the last convolutions with
    the head; what adapts and how far is chosen by ROC AUC on the calibrate part (never the audit part)."""
    from cxr.core.ort_session import make_session
    from cxr.export import head
    from cxr.train import metrics

    a_rows, c_rows = dec.rows_of(a_part), dec.rows_of(c_part)
    y_a, y_cr = dec.labels(a_part), dec.labels(c_part)
    w0 = head.read(base, kit.taps[0])
    new_head, losses = finetune_head(w0, dec.gap[a_rows], y_a, kit.replay_gap, kit.replay_teacher, steps=cfg.steps,
                                     learning_rate=cfg.learning_rate, replay_weight=cfg.replay_weight, l2=cfg.l2)
    model = head.write(base, kit.taps[0], new_head)
    tried = [{"what": "head", "calibrate_auc": metrics.roc_auc(y_cr, new_head.probability(dec.gap[c_rows]))}]
    chosen = tried[0]
    block_chosen = False
    if cfg.features in ("auto", "whole"):
        from cxr.export import adapt_features

        base_sess = make_session(base.SerializeToString())
        teacher = base_sess.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: dec.x[a_rows]})[0][:, 0].astype(np.float64)
        candidates = [*cfg.block_candidates, *([WHOLE_CANDIDATE] if cfg.features == "whole" else [])]
        for n_convs, lr in candidates:
            blk = adapt_features.find_block(base, kit.taps[0], n_convs)
            what = (f"last {n_convs} convolutions and head" if n_convs != adapt_features.WHOLE
                    else f"every convolution ({len(blk.convs) if blk else 0}) and head")
            if blk is None:
                tried.append({"what": what, "skipped": "the graph does not end in that many convolutions the trainer "
                              "runs (each plain or with a ReLU or ReLU6; a depthwise convolution ends the chain)"})
                continue
            acts = adapt_features.block_inputs(base, blk, dec.x)
            augment = cfg.augment and acts.shape[2:] == contract.IMAGE_SHAPE[:2]  # the block starts at the image
            replay = kit.replay_block_input == blk.input and len(kit.replay_block) > 0
            if replay:  # distil the shipped model's answers on its own training films' activations (the kit's)
                t_acts = kit.replay_block.astype(np.float32)
                t_prob, distill = kit.replay_teacher[kit.replay_block_index], cfg.replay_distill
            else:  # no replay for this block: distil on the site's adapt films (cfg.distill, 0 by default)
                t_acts, t_prob, distill = acts[a_rows], teacher, cfg.distill
            fit_b = adapt_features.finetune_block(
                acts[a_rows], y_a, t_acts, t_prob, adapt_features.conv_weights(base, blk), w0,
                val_acts=acts[c_rows], val_y=y_cr, epochs=cfg.block_epochs, learning_rate=lr, distill=distill,
                l2=cfg.block_l2, seed=cfg.seed, progress=progress, ops=blk.ops, strides=blk.strides, augment=augment)
            entry = {"what": what, "calibrate_auc": fit_b.history[fit_b.epoch]["calibrate_auc"], "epoch": fit_b.epoch,
                     "replay_films": len(t_acts) if replay else 0, "settings": fit_b.settings,
                     "history": list(fit_b.history)}
            tried.append(entry)
            if fit_b.epoch > 0 and entry["calibrate_auc"] > chosen["calibrate_auc"]:
                chosen, block_chosen = entry, True
                model = adapt_features.write_block(base, blk, fit_b)
    logger.info("adapts: %s (calibrate AUC %.3f)", chosen["what"], chosen["calibrate_auc"])
    return _Weights(model, new_head, losses, tried, chosen, block_chosen)


@dataclass(frozen=True)
class _SiteOod:
    """The OOD reference refitted with the site: shipped moments plus the adapt and calibrate parts as one more
    source (never the audit part's), its threshold and the scores of every reference set."""

    fit: OodFit
    sets: dict[str, np.ndarray]
    threshold: float
    site_features: np.ndarray


def _refit_ood(cfg: AdaptConfig, kit, dec: _Decoded, a_part: list[data_mod.Sample],
               c_part: list[data_mod.Sample]) -> _SiteOod:
    from cxr.export import ood_head

    lam = cfg.site_mass
    a_rows, c_rows = dec.rows_of(a_part), dec.rows_of(c_part)
    site_f = dec.feats[a_rows + c_rows]
    s_mean, s_cov = ood_head.moments(site_f)
    mean = (1 - lam) * kit.ood_mean + lam * s_mean
    cov = (1 - lam) * (kit.ood_cov + np.outer(kit.ood_mean - mean, kit.ood_mean - mean)) + lam * (
        s_cov + np.outer(s_mean - mean, s_mean - mean))
    held_out = np.isin(kit.real_set, ["train_validation"]) | np.char.startswith(kit.real_set, "validation_")
    fit = ood_head.shrink(mean, cov, np.concatenate([kit.real_features[held_out], site_f]), kit.taps,
                          n_train=kit.ood_n_train + len(site_f))
    sets = {name: fit.score(kit.real_features[kit.real_set == name]) for name in dict.fromkeys(kit.real_set)}
    sets["site_adapt"] = fit.score(dec.feats[a_rows])
    sets["site_calibrate"] = fit.score(dec.feats[c_rows])
    return _SiteOod(fit, sets, ood_head.choose_threshold(sets), site_f)


def _screened(dec: _Decoded, prob: np.ndarray, ood: np.ndarray, ood_threshold: float,
              part: list[data_mod.Sample]) -> list:
    """The part's films as the adapted model answers them (refusals by the rules or the OOD score included)."""
    from cxr.site import site_audit as audit_mod

    res = []
    for s in part:
        pre = dec.prepared[dec.index[s.path]]
        if s.path not in dec.row:
            assert pre.status is not None  # a film without a row was refused or unreadable before the model
            res.append(audit_mod.Screened(str(s.path), s.label, pre.status, None, None,
                                          pre.refusal.rule if pre.refusal is not None else None, s.patient))
            continue
        k = dec.row[s.path]
        if contract.is_out_of_distribution(ood[k], ood_threshold):
            res.append(audit_mod.Screened(str(s.path), s.label, contract.Status.NOT_ASSESSABLE, None, float(ood[k]),
                                          "out_of_distribution", s.patient))
        else:
            res.append(audit_mod.Screened(str(s.path), s.label, contract.Status.OK, float(prob[k]), float(ood[k]),
                                          None, s.patient))
    return res


def _site_threshold(cfg: AdaptConfig, aim: float, cal_films: list) -> tuple[float, dict, int]:
    """The threshold on the calibrate part's assessable films, with ``aim`` (:func:`_aim`) as the lower bound of
    their sensitivity: (threshold, its operating point, the positives it stood on)."""
    from cxr.site import site_audit as audit_mod
    from cxr.train.evaluate import choose_threshold, operating_point

    y_c = np.array([f.label for f in cal_films])
    p_c = np.array([f.probability for f in cal_films])
    if len(set(y_c.tolist())) < 2 or not supported_target(int(y_c.sum()), aim, cfg.calibration_confidence):
        raise audit_mod.InsufficientSample(
            f"the calibrate part has {int(y_c.sum())} assessable Pneumonia and {int((y_c == 0).sum())} Normal films: "
            f"too few to set a threshold with sensitivity >= {aim:.3f} at "
            f"{cfg.calibration_confidence:.0%} confidence; give a larger sample")
    threshold = choose_threshold(y_c, p_c, rule="sensitivity_lcb", target=aim,
                                 confidence=cfg.calibration_confidence)
    return threshold, operating_point(y_c, p_c, threshold, confidence=cfg.calibration_confidence), int(y_c.sum())


def service_point(card, population: str) -> tuple[str, float]:
    """The operating point the model in service answers the site's population at: the card's point of that name,
    else its default point, else its one threshold."""
    points = card.operating_points
    for name in (population, card.default_operating_point):
        if name and name in points:
            return name, float(points[name]["threshold"])
    return contract.SINGLE_OPERATING_POINT, float(card.threshold)


def _service_films(model_path: Path, card, dec: _Decoded, part: list[data_mod.Sample]) -> list:
    """The part's films as the model in service answers them (its own graph, OOD threshold and rules)."""
    from cxr.core.ort_session import make_session

    rows = dec.rows_of(part)
    prob = np.full(len(dec.x), np.nan)
    ood = np.full(len(dec.x), np.nan)
    if rows:
        sess = make_session(model_path.read_bytes())
        out = sess.run([contract.OUTPUT_NAME, contract.OOD_OUTPUT_NAME], {contract.INPUT_NAME: dec.x[rows]})
        prob[rows], ood[rows] = out[0][:, 0], out[1][:, 0]
    ood_threshold = float(card.ood.get("threshold", float("inf")))
    return _screened(dec, prob, ood, ood_threshold, part)


def _audit_claims(cfg: AdaptConfig, films: list, source: str, threshold: float, model_sha: str, targets):
    """``claims.json`` of the adapted model: one claim measured on the audit part (out of sample)."""
    from cxr.core.claims import Claims
    from cxr.train import claims as claims_mod

    claim = claims_mod.measure(
        source=source, population=cfg.population, operating_point=contract.SINGLE_OPERATING_POINT,
        threshold=threshold, y=np.array([f.label for f in films]),
        p=np.array([f.probability if f.probability is not None else np.nan for f in films]),
        patients=[f.patient or f.path for f in films], in_sample=False)
    return claim, Claims(claims=(claim,), model_sha256=model_sha,
                         method=f"patient bootstrap, {claims_mod.N_BOOT} resamples within class strata; refused films "
                                "are referrals and flagged",
                         confidence=claims_mod.CONFIDENCE, generated_by=f"cxr adapt {cfg.sample} --name {cfg.name}",
                         notes={source: f"the audit part of {cfg.sample} ({len(films)} films of "
                                        f"{len({f.patient for f in films})} patients); it chose nothing",
                                "targets": f"the targets of {cfg.targets_from}: "
                                + ", ".join(f"{k} {v}" for k, v in asdict(targets).items())})


def adapt(cfg: AdaptConfig, *, progress: bool = True) -> tuple[int, dict]:
    """Run the adaptation; return (exit code, summary). Exit 0: published; 3: the audit failed, nothing published.

    Steps: the three parts (:func:`_parts`); decoding and features (:func:`_decode`); weights fitted on the adapt
    part, chosen on the calibrate part (:func:`_fit_weights`); the OOD reference refitted (:func:`_refit_ood`); the
    threshold on the calibrate part (:func:`_site_threshold`); the audit part judged (it chooses nothing) and, on a
    pass only, the model published (:func:`_publish`).

    Raises:
        InsufficientSample: A part too small to show its targets (exit 2, with the films per class needed).
    """
    import onnx

    from cxr.core.claims import CLAIMS_FILE
    from cxr.core.eligibility import Eligibility
    from cxr.core.ort_session import make_session
    from cxr.export import adapt_kit, ood_head, repository
    from cxr.site import site_audit as audit_mod

    t0 = time.time()
    src_dir = Path(cfg.model_dir)
    card = repository.read_card(src_dir)
    model_path = repository.verified_onnx(src_dir, card)
    kit = adapt_kit.load(src_dir)
    dest = Path(cfg.out_repository) / cfg.name
    if dest.resolve() == src_dir.resolve():
        raise CxrError("the adapted model needs its own folder (--name or --out-repository)")
    targets = cfg.targets if cfg.targets is not None else audit_mod.Targets.from_card(card)
    assert isinstance(targets, audit_mod.Targets)
    provenance = ModelDir(src_dir).provenance()
    site = audit_mod.site_sample(Path(cfg.sample), provenance)
    if not site.patients_known:
        logger.warning("%s: %s", cfg.sample, audit_mod.NO_PATIENTS_WARNING)
    if cfg.confidence < audit_mod.PUBLISH_CONFIDENCE:
        logger.warning("confidence %.2f is below %.2f: this run explores and cannot publish", cfg.confidence,
                       audit_mod.PUBLISH_CONFIDENCE)
    report_dir = Path(cfg.report_dir)
    sample_sha = audit_mod.sample_sha256(site)
    earlier = audit_mod.earlier_attempts(report_dir, sample_sha)
    if earlier:
        logger.warning("earlier attempts on this sample (%d): %s", len(earlier),
                       "; ".join(f"{a['time']} {a['command']} {a['outcome']}" for a in earlier))
    attempt: dict[str, Any] = {"command": "cxr adapt", "sample": str(cfg.sample), "sample_sha": sample_sha,
               "options": attempt_options(cfg), "model_sha256": card.sha256}
    try:
        parts = _parts(cfg, site, targets)
    except audit_mod.InsufficientSample as exc:
        audit_mod.record_attempt(report_dir, **attempt, outcome="insufficient", detail={"why": str(exc)})
        raise
    a_part, c_part, u_part = parts["adapt"], parts["calibrate"], parts["audit"]

    # 1. decode under the model's own rules; features of the shipped graph
    rules = Eligibility.load(repository.ensure_eligibility(src_dir))
    base = ood_head.strip(onnx.load(str(model_path)))
    dec = _decode([*a_part, *c_part, *u_part], rules, base, kit, progress=progress)
    a_rows, c_rows = dec.rows_of(a_part), dec.rows_of(c_part)
    # 2. weights: fitted on the adapt part, chosen on the calibrate part
    weights = _fit_weights(cfg, base, kit, dec, a_part, c_part, progress=progress)
    # 3. the OOD reference with the site's adapt and calibrate parts, attached to the new graph
    site_ood = _refit_ood(cfg, kit, dec, a_part, c_part)
    model = ood_head.attach(weights.model, site_ood.fit)
    sess = make_session(model.SerializeToString())
    out = (sess.run([contract.OUTPUT_NAME, contract.OOD_OUTPUT_NAME], {contract.INPUT_NAME: dec.x}) if len(dec.x)
           else [np.zeros((0, 1))] * 2)
    prob, ood = out[0][:, 0].astype(np.float64), out[1][:, 0].astype(np.float64)
    # 4. the threshold on the calibrate part's assessable films, at the sensitivity aim (the target's, as the audit
    #    part's bound would need it)
    cal_films = [f for f in _screened(dec, prob, ood, site_ood.threshold, c_part) if f.probability is not None]
    aim = _aim(cfg, targets, c_part)
    if aim is None:  # _parts refused such a sample before any work
        raise audit_mod.InsufficientSample(f"the calibrate part cannot set a threshold for sensitivity "
                                           f"{targets.sensitivity}; give a larger sample")
    threshold, point, cal_positives = _site_threshold(cfg, aim, cal_films)
    model_bytes = model.SerializeToString()
    model_sha = hashlib.sha256(model_bytes).hexdigest()

    # 5. audit (chooses nothing) against the targets and against the model in service on the same patients;
    #    only on a pass, publish
    films = _screened(dec, prob, ood, site_ood.threshold, u_part)
    sets = site_ood.sets
    reference = {"ood_score": [float(v) for v in np.concatenate(list(sets.values()))],
                 "ood_threshold": site_ood.threshold}
    own = audit_mod.audit(films, threshold=threshold, targets=targets, reference=reference,
                          confidence=cfg.confidence)
    svc_point, svc_threshold = service_point(card, cfg.population)
    svc_films = _service_films(model_path, card, dec, u_part)
    svc = audit_mod.audit(svc_films, threshold=svc_threshold, targets=targets, confidence=cfg.confidence)
    comparison = audit_mod.compare_with_service(
        own, films, svc, svc_films, service_model=f"{card.model} ({card.sha256[:12]}) at {svc_point}",
        confidence=cfg.confidence)
    result = audit_mod.decide(own, comparison)
    result.update(targets_from=cfg.targets_from, sample_sha256=sample_sha, attempts=earlier)
    source = (site.films or site.set_aside)[0].source
    claim, claims = _audit_claims(cfg, films, source, threshold, model_sha, targets)
    split = {part: _part_counts(parts[part]) for part in PARTS}
    summary: dict = {
        "sample": str(cfg.sample), "sample_sha256": sample_sha, "from_model": card.model,
        "from_sha256": card.sha256, "seconds": time.time() - t0, "model_sha256": model_sha,
        # adapt/calibrate/audit: film counts (the model card's text reads them); parts: every part's counts
        "split": {"adapt": len(a_part), "calibrate": len(c_part), "audit": len(u_part),
                  "audit_patients": split["audit"]["patients"], "parts": split,
                  "set_aside": len(site.set_aside), "set_aside_by_role": site.set_aside_by_role(provenance),
                  "patients_known": site.patients_known, "seed": cfg.seed, "fixed": cfg.parts is not None,
                  "audit_drawn_by": "sha256 of the patient id" if cfg.parts is None else "the fixed split",
                  "adapt_used": len(a_rows), "calibrate_used": len(c_rows),
                  "by_patient": {s.patient: part for part in PARTS for s in parts[part]}},
        "targets": asdict(targets), "targets_from": cfg.targets_from, "confidence": cfg.confidence,
        "head": {"steps": cfg.steps, "loss_first": weights.losses[0], "loss_last": weights.losses[-1],
                 "replay_films": len(kit.replay_gap), "replay_weight": cfg.replay_weight, "l2": cfg.l2},
        "features": {"mode": cfg.features, "chosen": weights.chosen["what"],
                     "calibrate_auc": weights.chosen["calibrate_auc"], "tried": weights.tried,
                     "chosen_on": "calibrate part"},
        "ood": {"threshold": site_ood.threshold, "site_mass": cfg.site_mass, "shrinkage": site_ood.fit.shrinkage,
                "flagged": {k: float(np.mean(v > site_ood.threshold)) for k, v in sets.items()}},
        "calibration": {"rule": "sensitivity_lcb", "target": aim, "sensitivity_target": targets.sensitivity,
                        "confidence": cfg.calibration_confidence, "threshold": threshold,
                        "fitted_on": "calibrate part", "metrics": point,
                        "why_target": f"sensitivity {aim:.3f} as a {cfg.calibration_confidence:.0%} lower bound on the "
                        f"calibrate part's {cal_positives} assessable positives: what an audit part of the expected "
                        f"size ({round(sum(s.label for s in c_part) * cfg.audit_fraction / cfg.calibrate_fraction)} "
                        "Pneumonia films: the calibrate part's, times the parts' fractions) needs to show the "
                        f"sensitivity target "
                        f"{targets.sensitivity} ({cfg.targets_from}) at its {cfg.confidence:.0%} bound (the audit "
                        "part chose nothing, not even this aim)"},
        "audit": {k: result[k] for k in ("go", "meets_targets", "confidence_allows_go", "checks", "flagged",
                                         "sensitivity", "specificity", "roc_auc", "confidence", "needs_if_no",
                                         "comparison", "targets_from", "targets", "auc_targets_need")},
        "claim": claim.as_dict(),
        "attempts": earlier,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    summary["attempt"] = audit_mod.record_attempt(report_dir, **attempt, outcome="go" if result["go"] else "no-go",
                                                  detail={"model_sha256": model_sha})
    audit_mod.write(result, films, report_dir, model=cfg.name, sample=f"{cfg.sample} (audit part)")
    claims.save(report_dir / CLAIMS_FILE)
    (report_dir / "adapt.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    if not result["go"]:
        (report_dir / "unpublished.onnx").write_bytes(model_bytes)  # for inspection; never served from here
        logger.warning("audit failed; nothing published (report in %s)", report_dir)
        return audit_mod.NO_GO, summary
    _publish(cfg, src_dir, dest, card, model_bytes, summary, targets, site_ood, weights, threshold, point,
             len(cal_films), provenance, parts, dec, prob, ood, claims, kit)
    logger.info("published %s in %.0f s", dest, time.time() - t0)
    return audit_mod.GO, summary


def attempt_options(cfg: AdaptConfig) -> dict[str, Any]:
    """What an attempt is recorded with: every option that could change the decision (fractions, targets,
    confidences, features, seed, limits, masses)."""
    keys = ("calibrate_fraction", "audit_fraction", "confidence", "calibration_confidence", "population", "seed",
            "features", "adapt_limit", "site_mass", "block_epochs", "steps", "targets_from")
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    out["targets"] = asdict(cfg.targets) if cfg.targets is not None else None  # type: ignore[call-overload]
    out["fixed_split"] = cfg.parts is not None
    return out


def _publish(cfg: AdaptConfig, src_dir: Path, dest: Path, card, model_bytes: bytes, summary: dict,
             targets, site_ood: _SiteOod, weights: _Weights, threshold: float, point: dict, n_calibration: int,
             provenance: list[dict], parts: dict[str, list[data_mod.Sample]], dec: _Decoded, prob: np.ndarray,
             ood: np.ndarray, claims, kit) -> None:
    """Write the adapted model folder: staged under a hidden folder with the final name (Triton checks the
    config's name against the folder's), then put in place by :func:`publish_folder` (never a moment without a
    complete folder where the exchange is atomic; recoverable where it is not)."""
    from cxr.core.claims import CLAIMS_FILE
    from cxr.export import adapt_kit, repository
    from cxr.export.onnx_export import write_python_model

    fit = site_ood.fit
    staging = dest.parent / f".{dest.name}.staging" / dest.name
    shutil.rmtree(staging.parent, ignore_errors=True)
    (staging / "1").mkdir(parents=True)
    (staging / "1" / "model.onnx").write_bytes(model_bytes)
    write_python_model(staging, 1)
    shutil.copy(repository.ensure_eligibility(src_dir), staging / "eligibility.json")

    new_card = card.replace(
        model=cfg.name, version=1, file="1/model.onnx", sha256=summary["model_sha256"], bytes=len(model_bytes),
        precision="fp32", serving={"targets": list(repository.TARGETS["fp32"])},
        operating_points=None, default_operating_point=None,  # one threshold, the site's (named points: the base's)
        ood={**card.ood, "threshold": site_ood.threshold, "shrinkage": fit.shrinkage,
             "n_train": fit.n_train, "flagged": summary["ood"]["flagged"],
             "n": {k: len(v) for k, v in site_ood.sets.items()}, "parity_max_rel_diff": card.ood.get("parity_max_rel_diff"),
             "weighting": f"shipped moments plus the site's adapt and calibrate parts at mass {cfg.site_mass:.3f}"},
        calibration={**card.calibration, "threshold": threshold, "rule": "sensitivity_lcb",
                     "target": summary["calibration"]["target"], "sensitivity_target": targets.sensitivity,
                     "confidence": cfg.calibration_confidence, "fitted_on": f"{cfg.sample} (calibrate part)", "n_images": n_calibration,
                     "metrics": point, "previous_threshold": card.threshold},
        targets=asdict(targets),
        site={"sample": str(cfg.sample), "sample_sha256": summary["sample_sha256"], "split": summary["split"],
              "targets": asdict(targets), "targets_from": cfg.targets_from,
              "confidence": cfg.confidence, "claims": CLAIMS_FILE,
              "attempts": [*summary["attempts"], summary["attempt"]],
              "compared_with": summary["audit"]["comparison"]["service_model"],
              "audit_part": "judged the model and chose nothing (threshold: calibrate part; weights: adapt part)"},
        adaptation=summary, evaluations={},
        evaluations_of=f"see {CLAIMS_FILE} and adaptation.audit (the site's audit part)")
    new_card = repository.save_card(staging, new_card)
    ModelDir(staging).write_provenance(provenance)
    ModelDir(staging).write_provenance(data_mod.provenance_rows("adapt", parts["adapt"])
                                       + data_mod.provenance_rows("calibration", parts["calibrate"])
                                       + data_mod.provenance_rows("audit", parts["audit"]))
    site_rows = dec.rows_of(parts["adapt"]) + dec.rows_of(parts["calibrate"])
    if weights.block_chosen:  # the kit's features are the base block's: the reference is the site's own films
        repository.save_reference(staging, prob[site_rows], ood[site_rows], site_ood.threshold,
                                  what="the site's adapt and calibrate parts, answered by the adapted model")
    else:
        ref_x = np.concatenate([kit.real_features, site_ood.site_features])
        n_gap = kit.replay_gap.shape[1]
        repository.save_reference(staging, weights.head.probability(np.expm1(ref_x[:, :n_gap])),
                                  fit.score(ref_x), site_ood.threshold,
                                  what="the shipped reference sets (from the kit's features) and the "
                                  "site's adapt and calibrate parts")
    claims.save(staging / CLAIMS_FILE)
    shutil.copy(src_dir / adapt_kit.FILE_NAME, staging / adapt_kit.FILE_NAME)
    repository.write_configs(staging, new_card)
    publish_folder(staging, dest)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the
    file system cannot (the caller then renames in steps)."""
    import ctypes
    import os

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _aside(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def recover_publish(dest: Path) -> str:
    """Finish or undo a publish a crash interrupted (:func:`publish_folder`'s step-wise path): the old folder set
    aside comes back when no folder took its place, and is deleted when one did. Returns what it did
    (``restored``, ``cleaned`` or ``nothing``)."""
    from cxr.core.durable import fsync_dir

    old = _aside(dest)
    if not old.exists():
        return "nothing"
    if dest.exists():
        shutil.rmtree(old)
        return "cleaned"
    old.rename(dest)
    fsync_dir(dest.parent)
    logger.warning("%s: restored the model folder an interrupted publish had set aside", dest)
    return "restored"


def publish_folder(staging: Path, dest: Path) -> None:
    """Put the complete folder ``staging`` (its name is ``dest``'s) at ``dest``, replacing what is there:

    * no folder at ``dest``: one rename;
    * else, where the system can, one atomic exchange (``renameat2``), then the old folder (now at ``staging``)
      is deleted: at every moment ``dest`` is a complete model folder, old or new;
    * else rename the old aside (``.NAME.old``), rename the new in, delete the old; a crash between the two
      renames leaves the old folder aside, and :func:`recover_publish` (run first by every publish) puts it back.

    ``staging``'s parent (a hidden staging folder) is removed when empty.
    """
    from cxr.core.durable import fsync_dir

    staging, dest = Path(staging), Path(dest)
    recover_publish(dest)
    if not dest.exists():
        staging.rename(dest)
    elif _exchange(staging, dest):
        fsync_dir(dest.parent)
        fsync_dir(staging.parent)
        shutil.rmtree(staging)  # the old folder, swapped out
    else:
        old = _aside(dest)
        dest.rename(old)
        staging.rename(dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old)
    fsync_dir(dest.parent)
    if staging.parent.exists() and not any(staging.parent.iterdir()):
        staging.parent.rmdir()
