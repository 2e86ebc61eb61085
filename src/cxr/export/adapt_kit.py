"""``adapt_kit.npz``: what a model folder carries so that a hospital can adapt it offline (``cxr adapt``).

A hospital has the model folder and its own films, nothing else: no training
data, no Keras model, no network. The kit holds numbers, never images:

* a *replay set* for the classifier head: the pooled penultimate features of
  up to :data:`REPLAY_PER_CELL` training films per (source, class) cell, their
  labels, sources, and the shipped model's probabilities (the teacher, for
  distillation), so that fine-tuning on one site does not forget the others;
* optionally, a *replay set for the last convolutions*: the input activations of the network's last
  :data:`REPLAY_BLOCK_CONVS` convolutions (:func:`cxr.export.adapt_features.find_block`) for up to
  :data:`REPLAY_BLOCK_PER_CELL` training films per cell, float16 (:func:`block_arrays`), so that fine-tuning those
  convolutions at a site can distil the shipped model's answers on the training sources. :func:`save` does not
  write it (it makes the kit about 9.5 MB instead of 2, and measured on the SIIM sample it cost calibrate AUC for
  little retention: ``docs/onboarding.md``); ``scripts/kit_block_replay.py`` adds it to a copy of a model folder;
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
#: Convolutions whose input activations the kit carries, and films per cell (the first of the replay set's).
REPLAY_BLOCK_CONVS = 4
REPLAY_BLOCK_PER_CELL = 100


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
    replay_block_input: str = ""
    replay_block: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0, 0, 0), np.float16))
    replay_block_index: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, int))

    def __post_init__(self) -> None:
        if len(self.replay_block) != len(self.replay_block_index) or (len(self.replay_block) and not (
                self.replay_block_input and self.replay_block.ndim == 4
                and int(self.replay_block_index.max()) < len(self.replay_gap))):
            raise ValueError("the block replay needs its tensor name, NCHW activations and replay-set indices")
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


def block_arrays(model_path: Path, gap_tensor: str, x: np.ndarray, idx: np.ndarray, train_samples,
                 convs: int = REPLAY_BLOCK_CONVS, per_cell: int = REPLAY_BLOCK_PER_CELL) -> dict[str, np.ndarray]:
    """The kit's block replay arrays for the replay films ``x`` (rows ``idx`` of ``train_samples``): the first
    ``per_cell`` films of each (source, class) cell; empty when the graph's last block is not a Conv-ReLU chain."""
    from cxr.export import adapt_features, ood_head

    base = ood_head.strip(model_path)
    blk = adapt_features.find_block(base, gap_tensor, convs)
    if blk is None:
        return {}
    seen: dict[tuple[str, int], int] = {}
    keep = []
    for k, i in enumerate(idx):
        cell = (train_samples[i].source, train_samples[i].label)
        if seen.get(cell, 0) < per_cell:
            seen[cell] = seen.get(cell, 0) + 1
            keep.append(k)
    rows = np.array(keep, int)
    return {"replay_block_input": np.array(blk.input), "replay_block_index": rows,
            "replay_block": adapt_features.block_inputs(base, blk, x[rows]).astype(np.float16)}


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
            **({"replay_block_input": str(z["replay_block_input"]), "replay_block": z["replay_block"],
                "replay_block_index": z["replay_block_index"].astype(int)} if "replay_block" in z.files else {}),
        )
