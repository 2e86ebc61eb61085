"""Maintain exported models in a Triton model repository without their Keras source.

A hospital or an operator holds the model repository, not the training run.
These operations work on ``<repository>/<model>/`` alone:

* :func:`write_configs`: regenerate every Triton config of a model from its
  model card and ``eligibility.json`` (``cxr configs``), e.g. after a site
  edited the eligibility rules;
* :func:`refit_ood`: (re)fit the ``ood_score`` output on the training images
  and choose its threshold on real chest X-rays (``cxr ood-fit``);
* :func:`recalibrate`: choose a new decision threshold on a labelled site
  sample from the served model's own probabilities (``cxr calibrate --model
  <repository>/<model>``); the probability scaling baked into the graph is
  kept.

Each updates the model file's sha256, the model card (JSON and Markdown) and
the configs together.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr.core import contract, eligibility
from cxr.core.integrity import sha256_file
from cxr.core.model_dir import PROVENANCE_FILE, ModelCard, ModelDir, ServedParams, model_dirs
from cxr.core.ort_session import served_outputs
from cxr.core.paths import relative
from cxr.export import triton_config

logger = logging.getLogger(__name__)

#: Config targets per precision: the first is written as ``config.pbtxt``.
TARGETS = {"fp32": ("gpu", "gpu_fp16", "tensorrt_plan", "cpu", "cpu_triage"), "int8": ("cpu_ort", "cpu", "cpu_triage")}


def read_card(model_dir: Path) -> ModelCard:
    """The folder's card (edit it with its ``with_``/``replace`` methods and write it back with :func:`save_card`)."""
    return ModelDir(Path(model_dir)).card()


def onnx_path(model_dir: Path, card: ModelCard | None = None) -> Path:
    return ModelDir(Path(model_dir)).onnx_path(card)


def ensure_eligibility(model_dir: Path) -> Path:
    """The model folder's ``eligibility.json`` (the shipped default is copied in when missing)."""
    path = Path(model_dir) / eligibility.FILE_NAME
    if not path.exists():
        path.write_text(eligibility.default_text())
    eligibility.Eligibility.load(path)  # validate before it is served
    return path


def served_params(model_dir: Path, card: ModelCard | None = None) -> ServedParams:
    typed = card if card is not None else ModelDir(Path(model_dir)).card()
    points = tuple((name, float(p["threshold"])) for name, p in typed.operating_points.items())
    return ServedParams(threshold=typed.threshold, sha256=typed.sha256, ood_threshold=typed.ood_threshold,
                        eligibility=ensure_eligibility(model_dir).read_text(), operating_points=points,
                        default_operating_point=typed.default_operating_point if points else "")


def write_configs(model_dir: Path, card: ModelCard | None = None) -> list[Path]:
    """Regenerate the model's Triton configs from its card and eligibility rules."""
    card = card or read_card(model_dir)
    targets = card.serving_targets or TARGETS[card.precision]
    return triton_config.write_model_dir(Path(model_dir), served_params(model_dir, card), targets=targets)


def save_card(model_dir: Path, card: ModelCard) -> ModelCard:
    """Write the card (JSON and Markdown), stamped ``updated``; returns the card written."""
    from cxr.export.card import write_card

    card = card.replace(updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    write_card(Path(model_dir), card)
    return card


def set_default_point(model_dir: Path, name: str) -> None:
    """Make ``name`` the model's default operating point (a site's choice): the card's default and its
    ``calibration.threshold``, which the configs serve as ``threshold``."""
    card = read_card(model_dir)
    chosen = card.with_default_point(name)
    if chosen is not card:
        save_card(Path(model_dir), chosen)


def rewrite_configs(repository: Path, names: Sequence[str] = (), *, default_point: str | None = None) -> list[Path]:
    """Regenerate the Triton configs of the models ``names`` of ``repository`` (default: every model with a card),
    after making ``default_point`` their default operating point when given; returns the files written."""
    names = list(names) or [d.name for d in model_dirs(Path(repository))]
    written: list[Path] = []
    for n in names:
        if default_point:
            set_default_point(Path(repository) / n, default_point)
        written += write_configs(Path(repository) / n)
    return written


def verified_onnx(model_dir: Path, card: ModelCard) -> Path:
    """The graph's path, after checking it is the file the card describes (it is about to be modified)."""
    return ModelDir(Path(model_dir)).verify(card)


def refit_ood(
    model_dir: Path, *, data_dir: Path | None, split_file: Path, site_dir: Path | None, cache_dir: Path | None = None,
    command: str = "", non_chest_dir: Path | None = None, body_part: bool = True,
) -> dict:
    """Fit the OOD head of one model on its training split and write model, card, configs and the site files.

    The mean and covariance weight every source equally (a small adult source is not outvoted by Kaggle's 4,430
    films); the threshold keeps :data:`cxr.export.ood_head.PASS_RATE` of the pooled validation side, of each
    source's validation side, and of the site sample, and of the training films scored by fits that did not see
    them (each source's new patients and, with several sources, each source as a new hospital:
    :func:`cxr.export.ood_head.unseen_scores`). Also written: ``provenance.csv`` (every file that trained,
    validated or set a threshold, with its sha256), ``reference.json`` (the numbers drift monitoring and the site
    audit compare with) and ``adapt_kit.npz`` (what ``cxr adapt`` needs at a hospital).

    Args:
        model_dir: ``<repository>/<model>``.
        data_dir: Kaggle-layout root (needed only for splits written before sources were recorded).
        split_file: The training run's ``split.json`` (train side fits, validation side picks shrinkage).
        site_dir: Labelled site sample (its images count towards the threshold's pass rate).
        non_chest_dir: Radiographs of other body parts (``<part>/*.png``) for the body-part check, fitted with
            the local corpus (:mod:`cxr.export.body_part`); with ``body_part`` and no folder, the corpus alone.
        body_part: Fold the body-part check into ``ood_score``.

    A locked split's select side (every source's, the site sample's included) is the validation side here; its
    test side is never read.
    """
    from cxr.export import adapt_kit, ood_head
    from cxr.train import data as data_mod
    from cxr.train.evaluate import load_labelled

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    path = verified_onnx(model_dir, card)
    split = data_mod.Split.load(split_file)
    locked_train, locked_val = split.samples("train", data_dir), split.samples("val", data_dir)
    # fitted on the films the pixel rules accept; provenance lists every film of the lock in its role
    x_train, tr, _ = data_mod.load_samples(locked_train, cache_dir=cache_dir, progress=True, what="OOD fit, train")
    x_val, va, _ = data_mod.load_samples(locked_val, cache_dir=cache_dir, what="OOD fit, select")
    per_source = {name: sum(s.source == name for s in tr) for name in {s.source for s in tr}}
    weights = ood_head.source_weights(np.array([s.source for s in tr]))
    real = {"train_validation": x_val}
    if len(per_source) > 1:
        for name in sorted({s.source for s in va}):
            real[f"validation_{name}"] = x_val[[i for i, s in enumerate(va) if s.source == name]]
    site_rows: list[dict] = []
    if site_dir is not None:
        real["site"], _, _ = load_labelled(site_dir, cache_dir=cache_dir)
        site_rows = data_mod.provenance_rows("ood_reference", data_mod.folder_samples(site_dir))
    non_chest = None
    if body_part:
        from cxr.export.body_part import combined, load_non_chest, unjudgeable_chest

        non_chest = combined(load_non_chest(non_chest_dir, cache_dir=cache_dir),
                             unjudgeable_chest(x_train, [s.path.name for s in tr], seed=split.seed))
    report, feats = ood_head.build(path, x_train, real, weights=weights, non_chest=non_chest,
                                   sources=tuple(s.source for s in tr), patients=tuple(s.patient for s in tr))
    ood = {**report.as_dict(), "method": "Mahalanobis distance of log1p pooled features (ood_head)",
           "weighting": "every training source has equal mass" if len(per_source) > 1 else "equal per image",
           "fitted_on": {"train": relative(data_dir) if data_dir else None, "split": relative(split_file),
                         "site": relative(site_dir) if site_dir else None,
                         "not_chest": relative(non_chest_dir) if non_chest_dir else None}}
    card = card.replace(sha256=sha256_file(path), bytes=path.stat().st_size, ood=ood).with_outputs([
        {"name": contract.OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 1]},
        {"name": contract.OOD_OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 1]},
    ])
    folder = ModelDir(model_dir)
    chose = "select" if split.locked else "validation"
    folder.write_provenance(data_mod.provenance_rows("train", locked_train) + data_mod.provenance_rows(chose, locked_val)
                            + site_rows, replace_roles=("train", "validation", "select", "ood_reference"))
    card = card.replace(provenance={"file": PROVENANCE_FILE,
                                    "summary": data_mod.provenance_summary(folder.provenance())})
    x_ref = np.concatenate([x_val, real["site"]]) if "site" in real else x_val
    write_reference(model_dir, path, report.threshold, x_ref, what=f"{chose} side of {relative(split_file)}"
                    + (f" and {relative(site_dir)}" if site_dir else ""),
                    groups=[(s.source, s.label) for s in va])
    adapt_kit.save(model_dir, path, tr, x_train, feats, weights, seed=split.seed)
    if not card.go_live_targets:
        card = card.replace(targets=dict(DEFAULT_TARGETS))
    card = save_card(model_dir, card.with_command(command))
    write_configs(model_dir, card)
    return card.ood


#: Go-live targets a site audit checks unless the card states others (:attr:`ModelCard.go_live_targets`).
DEFAULT_TARGETS = {"sensitivity": 0.90, "specificity": 0.60, "roc_auc": 0.85, "flagged": 0.02}


def write_reference(model_dir: Path, model_path: Path, ood_threshold: float | None, images: np.ndarray, *,
                    what: str, groups: list[tuple[str, int]] | None = None) -> dict:
    """``reference.json``: the served outputs on real chest X-rays like those the model was validated on, as
    numbers (``probability`` of the films it judges, ``ood_score`` of all), for drift monitoring and the audit.
    ``groups``: (source, class index) of the first ``len(groups)`` images: the same numbers per source and class
    (``by_source``), so a monitor can build the reference of one hospital's population at a stated prevalence."""
    p, ood = served_outputs(model_path, images)
    return save_reference(model_dir, p, ood, ood_threshold, what=what, groups=groups)


def _reference_numbers(probability: np.ndarray, ood_score: np.ndarray, ood_threshold: float | None) -> dict:
    ok = ~np.array([contract.is_out_of_distribution(v, ood_threshold) for v in ood_score], bool)
    return {"n": int(len(probability)), "flagged_rate": float(1 - ok.mean()) if len(ok) else 0.0,
            "probability": [round(float(v), 6) for v in np.asarray(probability)[ok]],
            "ood_score": [round(float(v), 4) for v in ood_score]}


def save_reference(model_dir: Path, probability: np.ndarray, ood_score: np.ndarray, ood_threshold: float | None, *,
                   what: str, groups: list[tuple[str, int]] | None = None) -> dict:
    """Write ``reference.json`` from the served outputs of the reference films (numbers, one per film), and with
    ``groups`` (source, class index of the first films) the same per source and class under ``by_source``."""
    probability, ood_score = np.asarray(probability, float).ravel(), np.asarray(ood_score, float).ravel()
    ref = {"what": what, "ood_threshold": ood_threshold, **_reference_numbers(probability, ood_score, ood_threshold)}
    if groups:
        by_source: dict[str, dict] = {}
        for source in sorted({g[0] for g in groups}):
            for label in (0, 1):
                idx = [i for i, g in enumerate(groups) if g == (source, label)]
                if idx:
                    by_source.setdefault(source, {})[contract.LABELS[label]] = _reference_numbers(
                        probability[idx], ood_score[idx], ood_threshold)
        ref["by_source"] = by_source
    ModelDir(Path(model_dir)).write_reference(ref)
    return ref


def read_reference(model_dir: Path) -> dict | None:
    """The model's ``reference.json``, or ``None`` when it has none."""
    return ModelDir(Path(model_dir)).reference()


def recalibrate(
    model_dirs: list[Path], site_dir: Path | list[Path], *, rule: str = "sensitivity_lcb", target: float = 0.95,
    confidence: float = 0.9, cache_dir: Path | None = None, command: str = "",
) -> dict:
    """Choose a threshold on the first model's site probabilities and store it for every model given.

    The probability scaling baked into the ONNX graph stays; only the decision
    threshold moves. Images the eligibility rules or the OOD score refuse are
    left out of the fit (they get no label in service either).
    """
    from cxr.train.evaluate import choose_threshold, described, load_pooled, operating_point

    first = Path(model_dirs[0])
    card = read_card(first)
    for d in model_dirs:  # before any work: a card with operating points is not re-thresholded as a whole
        points = read_card(Path(d)).operating_points
        if points:
            from cxr.core.errors import CxrError

            raise CxrError(f"{d}: the model answers at operating points ({', '.join(sorted(points))}); "
                           "`cxr calibrate` sets one threshold: choose the points with `cxr operating-points`, or a "
                           "site's default with `cxr configs --default-operating-point`")
    path = verified_onnx(first, card)
    x, y, _ = load_pooled(site_dir, cache_dir=cache_dir)
    p, ood = served_outputs(path, x)
    ood_thr = card.ood_threshold
    keep = np.ones(len(y), bool) if ood_thr is None else ~np.array([contract.is_out_of_distribution(s, ood_thr) for s in ood])
    thr = choose_threshold(y[keep], p[keep], rule=rule, target=target, confidence=confidence)
    point = operating_point(y[keep], p[keep], thr, confidence=confidence)
    from cxr.train import data as data_mod

    folders = [site_dir] if isinstance(site_dir, Path) else list(site_dir)
    calib_rows = data_mod.provenance_rows("calibration", [s for f in folders for s in data_mod.folder_samples(f)])
    for d in model_dirs:
        c = read_card(d)
        folder = ModelDir(Path(d))
        folder.write_provenance(calib_rows, replace_roles=("calibration",))
        c = c.replace(provenance={"file": PROVENANCE_FILE, "summary": data_mod.provenance_summary(folder.provenance())})
        c = c.with_calibration(
            threshold=thr, rule=rule, target=target, confidence=confidence if rule == "sensitivity_lcb" else None,
            fitted_on=described(site_dir), n_images=int(keep.sum()), metrics=point,
            threshold_fitted_on_model=f"{first.name} (served ONNX probabilities; scaling baked into the graph kept)",
            previous_threshold=c.threshold)
        c = save_card(Path(d), c.with_command(command))
        write_configs(Path(d), c)
    return {"threshold": thr, "n_used": int(keep.sum()), "n_refused_ood": int((~keep).sum()), **point}
