"""The body-part check: is the input a chest film at all? Folded into the served ``ood_score``.

The feature-distance score (:mod:`cxr.export.ood_head`) measures how far an input's pooled features lie from the
training films'. Radiographs of other body parts (knees, hands) are grey, textured and bony like chest films, and
many of them land inside that distance: the model answered 202 of 300 knees. So a second, supervised check
reads the same features: a logistic regression of *not a chest film* against *chest film*, fitted on

* chest films: the training side of the model's split (every source, equal mass per source);
* other body parts: the fitting half of ``not_chest_radiographs`` (knees and hands, by patient), and the fitting
  half of the local corpus of generated and installed inputs (:mod:`cxr.train.ood_corpus`) that the pixel rules
  let through.

Its cut ``z0`` is the logit that keeps :data:`CHEST_PASS` of each source's select-side chest films (and of them
pooled). In the graph both checks become one score, refused above the one threshold ``T``::

    ood_score = max(distance, T * exp(clip(logit - z0, -30, 30)))

so a film is refused when its distance exceeds ``T`` or its logit exceeds ``z0``. It is validated on what it did
not see: the held-out halves, and each body part left out of the fit in turn (fit on knees, test on hands; and
the reverse).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError

logger = logging.getLogger(__name__)

#: Share of each source's real chest films (select side) the body-part check must let through.
CHEST_PASS = 0.995
#: L2 strength of the logistic fit (standardised features).
L2 = 10.0
#: Clip of ``logit - z0`` before the exponential (keeps the score finite in float32).
CLIP = 30.0


@dataclass(frozen=True)
class BodyPartHead:
    """The fitted check, as the graph computes it: ``logit = features @ w + b``; refused when ``logit > z0``.

    Attributes:
        w: Weights on the OOD head's transformed features ``(p,)``.
        b: Intercept.
        z0: The cut.
        scale: ``T``, the OOD threshold the body-part part of the score is scaled to.
    """

    w: np.ndarray = field(repr=False)
    b: float
    z0: float
    scale: float

    def __post_init__(self) -> None:
        if self.w.ndim != 1 or not np.isfinite(self.w).all():
            raise ValueError("body-part weights must be a finite vector")
        if not (np.isfinite(self.b) and np.isfinite(self.z0) and self.scale > 0):
            raise ValueError("body-part intercept, cut and scale must be finite (scale > 0)")

    def logit(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.w + self.b

    def score(self, features: np.ndarray) -> np.ndarray:
        """The body-part part of ``ood_score`` (float64 reference of the graph's arithmetic)."""
        return self.scale * np.exp(np.clip(self.logit(features) - self.z0, -CLIP, CLIP))


def fitting_half(key: str) -> bool:
    """A fixed half of the non-chest inputs (by the sha256 of the patient or item name): fitting or held out."""
    return hashlib.sha256(key.encode()).digest()[0] % 2 == 0


@dataclass(frozen=True)
class NonChest:
    """Non-chest inputs as contract images, each with its kind (``knee``, ``hand``, ``corpus:<category>``) and
    whether it is in the fitting half."""

    images: np.ndarray = field(repr=False)
    kinds: tuple[str, ...]
    fitting: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.kinds) == len(self.fitting)):
            raise ValueError("images, kinds and fitting must be one length")


def load_non_chest(folder: Path | None, *, cache_dir: Path | None = None, corpus: bool = True) -> NonChest:
    """Radiographs of other body parts (``folder/<part>/*.png``, patients from the file names) and the local
    corpus's items that reach the model (those the pixel rules refuse never need this check)."""
    import re

    from cxr.core import imaging
    from cxr.core.errors import InvalidInputError, NotAssessableError
    from cxr.train import data as data_mod
    from cxr.train import ood_corpus

    arrays: list[np.ndarray] = []
    kinds: list[str] = []
    fitting: list[bool] = []
    if folder is not None:
        folder = Path(folder)
        paths = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in contract.IMAGE_SUFFIXES)
        if not paths:
            raise CxrError(f"{folder}: no images in <body part>/ folders")
        x, kept, _ = data_mod.load_assessable(paths, cache_dir=cache_dir)
        for k, i in enumerate(kept):
            p = paths[i]
            patient = re.sub(r"[LR]?_kl\d+$", "", p.stem)  # knee_9001400L_kl1 -> knee_9001400 (both knees)
            arrays.append(x[k])
            kinds.append(p.parent.name)
            fitting.append(fitting_half(patient))
    if corpus:
        for item in ood_corpus.build(include_installed=True):
            try:
                arrays.append(imaging.preprocess(item.data, name=item.name))
            except (NotAssessableError, InvalidInputError):
                continue
            kinds.append(f"corpus:{item.category}")
            fitting.append(fitting_half(item.name))
    if not arrays:
        raise CxrError("no non-chest inputs to fit the body-part check")
    return NonChest(np.stack(arrays), tuple(kinds), np.array(fitting, bool))


#: Training chest films turned into films no reader would screen as they are (a negative, upside down, on its side),
#: added to the non-chest side of the fit: per-image scaling makes an inverted film look like a chest film to the
#: feature distance, and the EfficientNet answered 7 of 8 inverted example films before these were in the fit.
UNJUDGEABLE_PER_KIND = 200


def unjudgeable_chest(chest: np.ndarray, names: list[str], *, per_kind: int = UNJUDGEABLE_PER_KIND,
                      seed: int = 0) -> NonChest:
    """Inverted and rotated (90 and 180 degrees) copies of ``per_kind`` chest films each (drawn by ``seed``), kinds
    ``unjudgeable:<how>``; a film is in the fitting half by its name (:func:`fitting_half`), so the other half
    validates the check on films it did not see."""
    rng = np.random.default_rng(seed)
    arrays: list[np.ndarray] = []
    kinds: list[str] = []
    fitting: list[bool] = []
    ops = {"inverted": lambda x: 255 - x, "rotated_90": lambda x: np.rot90(x, 1, axes=(0, 1)),
           "rotated_180": lambda x: np.rot90(x, 2, axes=(0, 1))}
    for how, op in ops.items():
        for i in rng.permutation(len(chest))[:per_kind]:
            arrays.append(np.ascontiguousarray(op(chest[i])))
            kinds.append(f"unjudgeable:{how}")
            fitting.append(fitting_half(f"{how}:{names[i]}"))
    return NonChest(np.stack(arrays), tuple(kinds), np.array(fitting, bool))


def combined(*parts: NonChest) -> NonChest:
    return NonChest(np.concatenate([p.images for p in parts]), tuple(k for p in parts for k in p.kinds),
                    np.concatenate([p.fitting for p in parts]))


def _cut(logits: dict[str, np.ndarray]) -> float:
    """The smallest cut that keeps :data:`CHEST_PASS` of each chest set and of them pooled."""
    def keep(s: np.ndarray) -> float:
        s = np.sort(np.asarray(s, np.float64))
        return float(s[int(np.ceil(CHEST_PASS * len(s))) - 1])

    cut = keep(np.concatenate(list(logits.values())))
    for s in logits.values():
        cut = max(cut, keep(s))
    return float(np.nextafter(np.float32(cut), np.float32(np.inf)))


def fit(chest_train: np.ndarray, chest_weights: np.ndarray, non_chest: np.ndarray, chest_select: dict[str, np.ndarray],
        *, scale: float) -> BodyPartHead:
    """Fit the check on features (chest training films, weighted; non-chest fitting films) and cut it on the
    select side's chest films of each source."""
    from cxr.train.linear import fit_logistic

    x = np.concatenate([chest_train, non_chest])
    y = np.r_[np.zeros(len(chest_train)), np.ones(len(non_chest))]
    w = np.r_[0.5 * chest_weights / np.sum(chest_weights), np.full(len(non_chest), 0.5 / len(non_chest))]
    model = fit_logistic(x, y, weights=w, l2=L2)
    wv, b = model.folded()
    head = BodyPartHead(wv, b, 0.0, scale)
    z0 = _cut({k: head.logit(v) for k, v in chest_select.items()})
    return BodyPartHead(wv, b, z0, scale)


def validate(chest_train: np.ndarray, chest_weights: np.ndarray, chest_select: dict[str, np.ndarray],
             non: NonChest, features: np.ndarray, *, scale: float) -> dict:
    """Refusal rates of the check on inputs it did not see: the held-out half of each kind with the fit on the
    fitting half, and each radiograph body part with a fit that left that part out entirely."""
    out: dict = {"held_out_half": {}, "left_out_part": {}}
    head = fit(chest_train, chest_weights, features[non.fitting], chest_select, scale=scale)
    kinds = np.array(non.kinds)
    for kind in sorted(set(non.kinds)):
        m = (kinds == kind) & ~non.fitting
        if m.any():
            out["held_out_half"][kind] = {"n": int(m.sum()), "refused": float(np.mean(head.logit(features[m]) > head.z0))}
    for part in sorted(k for k in set(non.kinds) if not k.startswith("corpus:")):
        keep = non.fitting & (kinds != part)
        if not keep.any():
            continue
        h = fit(chest_train, chest_weights, features[keep], chest_select, scale=scale)
        m = kinds == part
        out["left_out_part"][part] = {"n": int(m.sum()), "refused": float(np.mean(h.logit(features[m]) > h.z0)),
                                      "fitted_on": sorted(set(kinds[keep].tolist()))}
    return out
