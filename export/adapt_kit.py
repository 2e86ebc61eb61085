"""``adapt_kit.npz``: what a model folder carries so that a hospital can adapt it offline (``cxr adapt``).

A hospital has the model folder and its own films, nothing else: no training
data, no Keras model, no network. The kit holds numbers, never images:

* a *replay set* for the classifier head: the pooled penultimate features of
  up to :data:`REPLAY_PER_CELL` training films per (source, class) cell, their
  labels, sources, and the shipped model's probabilities (the teacher, for
  distillation), so that fine-tuning on one site does not forget the others;
* the out-of-distribution head's inputs: the weighted mean and (unshrunk)
  covariance of the training features and the features of every set of real
  chest X-rays its threshold was chosen on, so the OOD reference can be refitted
  to include the site and the threshold can still keep those sets.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.core.errors import CxrError

FILE_NAME = "adapt_kit.npz"
#: Training films per (source, class) cell in the replay set.
REPLAY_PER_CELL = 200


@dataclass(frozen=True)
class AdaptKit:
    """The kit's arrays (see the module docstring)."""

    taps: tuple[str, ...]
    replay_gap: np.ndarray = field(repr=False)
    replay_label: np.ndarray = field(repr=False)
    replay_source: np.ndarray = field(repr=False)
    replay_teacher: np.ndarray = field(repr=False)
    ood_mean: np.ndarray = field(repr=False)
    ood_cov: np.ndarray = field(repr=False)
    ood_n_train: int = 0
    real_features: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    real_set: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=str))

    def __post_init__(self) -> None:
        n = len(self.replay_gap)
        if not (len(self.replay_label) == len(self.replay_source) == len(self.replay_teacher) == n) or n == 0:
            raise ValueError("the replay set's arrays must have one entry per film, and at least one film")
        p = len(self.ood_mean)
        if self.ood_cov.shape != (p, p) or self.real_features.shape[1:] != (p,) or len(self.real_set) != len(self.real_features):
            raise ValueError("the OOD arrays do not match")


def save(model_dir: Path, model_path: Path, train_samples, x_train: np.ndarray, feats, weights: np.ndarray, *,
         seed: int = 0) -> Path:
    """Write the kit for the model at ``model_path`` (``feats``: the OOD fit's :class:`OodFeatures`)."""
    from cxr.core.durable import write_durably
    from cxr.core.ort_session import served_outputs
    from cxr.export import ood_head

    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(train_samples):
        cells.setdefault((s.source, s.label), []).append(i)
    idx = np.sort(np.concatenate([rng.permutation(v)[:REPLAY_PER_CELL] for _, v in sorted(cells.items())]))
    x = x_train[idx]
    taps = feats.fit.taps
    gap = ood_head.FeatureExtractor(ood_head.strip(model_path), taps[:1], log=False)(x)
    teacher, _ = served_outputs(model_path, x)
    mean, cov = ood_head.moments(feats.train, weights)
    names = list(ood_head.disjoint(feats.real))  # each reference film once
    buf = io.BytesIO()
    np.savez_compressed(
        buf, taps=np.array(taps), replay_gap=gap.astype(np.float32),
        replay_label=np.array([train_samples[i].label for i in idx], np.int8),
        replay_source=np.array([train_samples[i].source for i in idx]),
        replay_teacher=teacher.astype(np.float32), ood_mean=mean, ood_cov=cov.astype(np.float32),
        ood_n_train=np.int64(len(feats.train)),
        real_features=np.concatenate([feats.real[k] for k in names]).astype(np.float16),
        real_set=np.concatenate([np.full(len(feats.real[k]), k) for k in names]),
    )
    out = Path(model_dir) / FILE_NAME
    write_durably(out, buf.getvalue())
    return out


def load(model_dir: Path) -> AdaptKit:
    """Read the kit of a model folder.

    Raises:
        CxrError: The folder has no kit (exported before kits existed: rerun ``cxr ood-fit`` on it).
    """
    path = Path(model_dir) / FILE_NAME
    if not path.exists():
        raise CxrError(f"{model_dir}: no {FILE_NAME}; refit its OOD head (`cxr ood-fit`) to write one")
    with np.load(path, allow_pickle=False) as z:
        return AdaptKit(
            taps=tuple(str(t) for t in z["taps"]), replay_gap=z["replay_gap"].astype(np.float64),
            replay_label=z["replay_label"].astype(int), replay_source=z["replay_source"].astype(str),
            replay_teacher=z["replay_teacher"].astype(np.float64), ood_mean=z["ood_mean"].astype(np.float64),
            ood_cov=z["ood_cov"].astype(np.float64), ood_n_train=int(z["ood_n_train"]),
            real_features=z["real_features"].astype(np.float64),
            real_set=z["real_set"].astype(str),
        )
