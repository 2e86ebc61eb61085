"""The learned out-of-distribution score: a second model output, ``ood_score``, added to the ONNX graph.

The score is the Mahalanobis distance of the network's own pooled features
from the training X-rays' features (Lee et al. 2018), computed inside the
served graph so that Triton, the embedded runtime and every client see the same
number:

* taps: the penultimate features (the global average pool feeding the head)
  and the same pooling over an earlier stage (twice the spatial resolution),
  each ``log1p``-transformed (the ReLU features are skewed) and concatenated;
* a mean and a covariance fitted on the training side of the model's split,
  with the covariance shrunk towards a scaled identity,
  ``(1 - a) S + a tr(S)/p I``, where ``a`` maximises the Gaussian likelihood
  of the *validation* side (no out-of-distribution data is used to fit it);
* ``ood_score = || (f - mu) L ||`` with ``L L^T`` the inverse covariance,
  shape ``[batch, 1]``.

The threshold is chosen on real chest X-rays only: the smallest value that
keeps :data:`PASS_RATE` of all held-out real films pooled (every source's
validation side and the site sample) and :data:`PER_SET_PASS_RATE` of each set. Measured alternatives (feature norm, energy, Mahalanobis on
the 128-unit dense layer or on one tap) are compared in ``docs/model/ood.md``.

A training source's films are close to the fit that saw them, and a few dozen validation films of a small source
say little about its next patients (issue 32: NIH's 59 select films passed 98%, its test patients 87%). With the
training sources and patients given (:func:`unseen_scores`), two more kinds of set count towards the threshold,
each film scored by a fit that did not see it: **new patients** of every training source (the training films,
cross-fitted over :data:`CROSS_FOLDS` folds of patients; :data:`PER_SET_PASS_RATE` of each) and **a new hospital**
(every source's films, by a fit on the other sources; :data:`NEW_HOSPITAL_PASS_RATE` of each), so that the
distance refuses what lies beyond the differences between hospitals, and the body-part check
(:mod:`cxr.export.body_part`) refuses other body parts and non-radiographs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError, ExportValidationError
from cxr.core.graph import OOD_PREFIX as PREFIX
from cxr.core.graph import load as _load
from cxr.core.graph import strip_ood as strip
from cxr.export.body_part import CLIP as BODY_CLIP
from cxr.export.body_part import BodyPartHead, NonChest

logger = logging.getLogger(__name__)

#: Keras layer names whose outputs are tapped, per architecture (the GAP output first).
TAPS = {
    "compact_cnn": ("gap", "s2b_relu"),
    "inception_v3": ("gap", "mixed7"),
    # the GAP alone: with a second tap (block 12's expansion, 1,152 channels) the precision matrix in the graph
    # and the adapt kit's covariance were 23 MB each, too large for a model folder kept in git
    "efficientnet_lite0": ("gap",),
}
#: Fraction of all held-out real chest X-rays, pooled, that must pass.
PASS_RATE = 0.995
#: Fraction of each set of real chest X-rays (each source's validation side, the site sample) that must pass.
#: Lower than :data:`PASS_RATE` on purpose: on a set of 79 films "keep 99.5%" means "keep the maximum", and a
#: single outlying film would then set the threshold for every input.
PER_SET_PASS_RATE = 0.98
#: Fraction of each source's films that must pass when the distance comes from a fit without that source (a
#: hospital the model never saw).
NEW_HOSPITAL_PASS_RATE = 0.95
#: Folds of patients for the new-patient (cross-fitted) scores of the training films.
CROSS_FOLDS = 5
#: Shrinkage candidates searched by validation likelihood.
SHRINKAGE_GRID = tuple(float(a) for a in np.logspace(-5, -0.3, 30))
#: ood_score parity tolerance, relative: the graph's float32 head against the float64 distance of the same graph's
#: features (see :func:`build`).
OOD_RTOL = 1e-4


@dataclass(frozen=True)
class OodFit:
    """A fitted Mahalanobis head.

    Attributes:
        taps: ONNX tensor names tapped, in order.
        mean: Feature mean ``(p,)``.
        chol: ``L`` with ``L @ L.T`` the shrunk precision ``(p, p)``.
        shrinkage: The chosen ``a``.
        n_train: Training images the mean and covariance come from.
        body: The body-part check folded into the score (:mod:`cxr.export.body_part`), or ``None``.
    """

    taps: tuple[str, ...]
    mean: np.ndarray = field(repr=False)
    chol: np.ndarray = field(repr=False)
    shrinkage: float = 0.0
    n_train: int = 0
    body: BodyPartHead | None = None

    def __post_init__(self) -> None:
        p = self.mean.shape[0]
        if self.mean.ndim != 1 or self.chol.shape != (p, p):
            raise ValueError(f"mean {self.mean.shape} and chol {self.chol.shape} do not match")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.chol).all()):
            raise ValueError("OOD fit holds NaN or Inf")

    def distance(self, features: np.ndarray) -> np.ndarray:
        """The Mahalanobis part ``(N,)`` in float64 from transformed features ``(N, p)``."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.chol
        return np.sqrt((z * z).sum(axis=1))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Reference ``ood_score`` ``(N,)`` in float64: the distance, or the body-part part where it is larger."""
        d = self.distance(features)
        return d if self.body is None else np.maximum(d, self.body.score(features))


def find_taps(model, layers: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """ONNX tensor names of the tapped layers (by Keras layer name inside tf2onnx's node names).

    The GAP tap is the output of the squeeze after the head's global average
    pool (2-D); other taps are ReLU / concat outputs (4-D, NCHW).
    """
    g = _load(model).graph
    if layers is None:
        arch = next((a for a in TAPS if any(f"{a}_logit" in n.name or n.name.startswith(f"{a}/") for n in g.node)), None)
        if arch is None:
            raise CxrError("cannot tell the architecture from the ONNX node names; pass the tap layers explicitly")
        layers = TAPS[arch]
    names = []
    for layer in layers:
        hits = [o for n in g.node for o in n.output if f"/{layer}_1/" in o or f"/{layer}/" in o]
        if not hits:
            raise CxrError(f"no tensor of layer {layer!r} in the ONNX graph")
        names.append(hits[-1])  # the layer's last op: the squeezed GAP, the ReLU, the concat
    return tuple(names)


class FeatureExtractor:
    """Runs the base graph with the taps as extra outputs; returns the transformed features ``(N, p)``."""

    def __init__(self, model, taps: tuple[str, ...], *, threads: int = 0, log: bool = True) -> None:
        import onnx

        from cxr.core.ort_session import make_session

        m = strip(model)
        for t in taps:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        self.taps = taps
        self.log = log
        self.session = make_session(m.SerializeToString(), threads=threads)

    def __call__(self, images: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
        contract.validate_batch(images)
        parts = []
        for i in range(0, len(images), batch_size):
            outs = self.session.run(list(self.taps), {contract.INPUT_NAME: images[i : i + batch_size]})
            pooled = [_pool(o).astype(np.float64) for o in outs]
            parts.append(np.concatenate([np.log1p(f) if self.log else f for f in pooled], axis=1))
        return np.concatenate(parts)


def _pool(a: np.ndarray) -> np.ndarray:
    return a.mean(axis=(2, 3)) if a.ndim == 4 else a.reshape(len(a), -1)


def fit(train_features: np.ndarray, val_features: np.ndarray, taps: tuple[str, ...],
        weights: np.ndarray | None = None) -> OodFit:
    """Mean and shrunk covariance from training features; shrinkage by validation likelihood.

    ``weights`` (one per training image, e.g. equal mass per source) weight the mean and covariance, so that a
    small source's films are not outvoted by a large one's."""
    x = np.asarray(train_features, np.float64)
    v = np.asarray(val_features, np.float64)
    if len(x) < 10 or len(v) < 5:
        raise CxrError(f"too few images to fit the OOD head ({len(x)} train, {len(v)} validation)")
    mean, cov = moments(x, weights)
    return shrink(mean, cov, v, taps, n_train=len(x))


def moments(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and (biased) covariance of features ``(N, p)``."""
    x = np.asarray(x, np.float64)
    w = np.full(len(x), 1.0 / len(x)) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    if w.shape != (len(x),) or not (w >= 0).all():
        raise CxrError("OOD fit weights must be one non-negative number per training image")
    mean = w @ x
    return mean, (x - mean).T @ ((x - mean) * w[:, None])


def shrink(mean: np.ndarray, cov: np.ndarray, val_features: np.ndarray, taps: tuple[str, ...], *, n_train: int) -> OodFit:
    """The fit from a mean and covariance, with the shrinkage that maximises the validation likelihood."""
    v = np.asarray(val_features, np.float64)
    p = cov.shape[0]
    scale = float(np.trace(cov)) / p
    best: tuple[float, float] | None = None
    for a in SHRINKAGE_GRID:
        c = (1 - a) * cov + a * scale * np.eye(p)
        sign, logdet = np.linalg.slogdet(c)
        if sign <= 0:
            continue
        d = np.linalg.solve(c, (v - mean).T).T
        ll = -0.5 * (logdet + float(np.einsum("ij,ij->i", v - mean, d).mean()))
        if best is None or ll > best[0]:
            best = (ll, a)
    if best is None:
        raise CxrError("OOD covariance is singular at every shrinkage")
    return at_shrinkage(mean, cov, best[1], taps, n_train=n_train)


def at_shrinkage(mean: np.ndarray, cov: np.ndarray, a: float, taps: tuple[str, ...] = (), *,
                 n_train: int = 0) -> OodFit:
    """The fit from a mean and covariance shrunk by ``a`` towards the scaled identity, ``(1 - a) S + a tr(S)/p I``."""
    p = cov.shape[0]
    scale = float(np.trace(cov)) / p
    precision = np.linalg.inv((1 - a) * cov + a * scale * np.eye(p))
    chol = np.linalg.cholesky((precision + precision.T) / 2)
    return OodFit(taps=taps, mean=mean, chol=chol, shrinkage=a, n_train=n_train)


def _keep(s: np.ndarray, rate: float) -> float:
    s = np.sort(np.asarray(s, np.float64))
    return float(s[int(np.ceil(rate * len(s))) - 1])  # the order statistic that keeps >= rate of s


def disjoint(sets: dict) -> dict:
    """The named sets without ``train_validation`` when its per-source parts (``validation_<source>``) are there
    too (it is their union), so that no film counts twice."""
    if any(k.startswith("validation_") for k in sets):
        return {k: v for k, v in sets.items() if k != "train_validation"}
    return dict(sets)


def choose_threshold(scores: dict[str, np.ndarray], *, pass_rate: float = PASS_RATE,
                     per_set_rate: float = PER_SET_PASS_RATE,
                     unseen: dict[str, tuple[np.ndarray, float]] | None = None) -> float:
    """The smallest threshold that keeps at least ``pass_rate`` of all the real X-rays pooled (each film once,
    :func:`disjoint`), at least ``per_set_rate`` of each named set, and of each ``unseen`` set (scores of films by
    a fit that did not see them, :func:`unseen_scores`) its own rate; the unseen sets are not pooled."""
    for name, s in {**scores, **{k: v[0] for k, v in (unseen or {}).items()}}.items():
        if not len(s):
            raise CxrError(f"no scores for {name}")
    thr = _keep(np.concatenate([np.asarray(v, np.float64) for v in disjoint(scores).values()]), pass_rate)
    for s in scores.values():
        thr = max(thr, _keep(s, per_set_rate))
    for s, rate in (unseen or {}).values():
        thr = max(thr, _keep(s, rate))
    return float(np.nextafter(np.float32(thr), np.float32(np.inf)))  # representable, and >= every kept score


def source_weights(sources: np.ndarray) -> np.ndarray:
    """One weight per film: every source the same total mass (as :func:`cxr.export.repository.refit_ood` fits)."""
    names, counts = np.unique(sources, return_counts=True)
    per = dict(zip(names, counts))
    return np.array([1.0 / (len(names) * per[s]) for s in sources])


@dataclass(frozen=True)
class Unseen:
    """Distances of one source's training films from fits that did not see them (:func:`unseen_scores`).

    Attributes:
        kind: ``new_patients`` (cross-fitted over folds of patients) or ``new_hospital`` (fitted on the other
            sources only).
        source: The source the films come from.
        distances: ``(N,)``, in the source's film order.
        pass_rate: The share of them the threshold must keep.
    """

    kind: str
    source: str
    distances: np.ndarray = field(repr=False)
    pass_rate: float = PER_SET_PASS_RATE

    def __post_init__(self) -> None:
        if self.kind not in ("new_patients", "new_hospital") or not 0 < self.pass_rate <= 1:
            raise ValueError(f"unseen set {self.kind!r} at pass rate {self.pass_rate}")

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.source}"


def unseen_scores(features: np.ndarray, sources: list[str] | tuple[str, ...], patients: list[str] | tuple[str, ...],
                  shrinkage: float, *, folds: int = CROSS_FOLDS, seed: int = 0,
                  min_films: int = 20) -> list[Unseen]:
    """Distances of the training films from fits that did not see them, every fit weighting its sources equally
    and shrunk by ``shrinkage``:

    * ``new_patients_<source>``: each film from a fit on the other folds of patients (``folds``, drawn by
      ``seed``): the source's next patients; to keep :data:`PER_SET_PASS_RATE`;
    * ``new_hospital_<source>`` (with two sources or more): each film from a fit on the other sources only: a
      hospital the model never saw; to keep :data:`NEW_HOSPITAL_PASS_RATE`.

    Sources with fewer than ``min_films`` films get no set of their own (their films still fit the others).
    """
    x = np.asarray(features, np.float64)
    src = np.asarray(sources)
    pat = np.asarray(patients)
    if not (len(src) == len(pat) == len(x)):
        raise CxrError(f"{len(x)} films, {len(src)} sources and {len(pat)} patients")
    if folds < 2:
        raise CxrError(f"folds must be >= 2, got {folds}")

    def distance(fit_on: np.ndarray, score: np.ndarray) -> np.ndarray:
        mean, cov = moments(x[fit_on], source_weights(src[fit_on]))
        return at_shrinkage(mean, cov, shrinkage, n_train=int(fit_on.sum())).distance(x[score])

    names = sorted(set(src.tolist()))
    rng = np.random.default_rng(seed)
    keys = sorted(set(zip(src.tolist(), pat.tolist())))  # a patient is one key within its source
    order = {keys[j]: i % folds for i, j in enumerate(rng.permutation(len(keys)))}
    fold = np.array([order[k] for k in zip(src.tolist(), pat.tolist())])
    crossed = np.full(len(x), np.nan)
    for k in range(folds if len(keys) >= folds else 0):
        held = fold == k
        if held.any() and (~held).any():
            crossed[held] = distance(~held, held)
    out: list[Unseen] = []
    for name in names:
        own = src == name
        if own.sum() < min_films:
            continue
        if np.isfinite(crossed[own]).all():
            out.append(Unseen("new_patients", name, crossed[own], PER_SET_PASS_RATE))
        if len(names) > 1:
            out.append(Unseen("new_hospital", name, distance(~own, own), NEW_HOSPITAL_PASS_RATE))
    return out


def _counting_refused(unseen: Unseen, refused: np.ndarray) -> Unseen:
    """``unseen`` with the films the body-part check refuses counted as refused (infinite distance), so that the
    two checks together keep its pass rate; where the body-part check alone refuses more of these training films
    than the rate allows (its cut is chosen on select films, so it can on a small training set), the distance is
    held to the rate on its own instead."""
    counted = replace(unseen, distances=np.where(refused, np.inf, unseen.distances))
    if np.isfinite(_keep(counted.distances, counted.pass_rate)):
        return counted
    logger.warning("the body-part check refuses %d of %d %s films; the distance keeps %.0f%% of them on its own",
                   int(refused.sum()), len(refused), unseen.name, 100 * unseen.pass_rate)
    return unseen


def attach(model, ood: OodFit):
    """Return ``model`` (without any previous head) with the ``ood_score`` output appended."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = strip(model)
    g = m.graph
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    pooled = []
    for i, t in enumerate(ood.taps):
        src = t
        if _rank(m, t) == 4:  # NCHW maps: global average pool, then flatten to (N, C)
            g.node.append(helper.make_node("GlobalAveragePool", [t], [f"{PREFIX}gap{i}"], name=f"{PREFIX}gap{i}"))
            g.node.append(helper.make_node("Flatten", [f"{PREFIX}gap{i}"], [f"{PREFIX}flat{i}"], name=f"{PREFIX}flat{i}", axis=1))
            src = f"{PREFIX}flat{i}"
        pooled.append(src)
    # log1p(x) = Log(x + 1); the tapped features are ReLU outputs (>= 0)
    g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), f"{PREFIX}one"))
    logs = []
    for i, src in enumerate(pooled):
        g.node.append(helper.make_node("Add", [src, f"{PREFIX}one"], [f"{PREFIX}plus1_{i}"], name=f"{PREFIX}plus1_{i}"))
        g.node.append(helper.make_node("Log", [f"{PREFIX}plus1_{i}"], [f"{PREFIX}log{i}"], name=f"{PREFIX}log{i}"))
        logs.append(f"{PREFIX}log{i}")
    g.node.append(helper.make_node("Concat", logs, [f"{PREFIX}features"], name=f"{PREFIX}concat", axis=1))
    g.initializer.append(numpy_helper.from_array(ood.mean.astype(np.float32), f"{PREFIX}mean"))
    g.initializer.append(numpy_helper.from_array(ood.chol.astype(np.float32), f"{PREFIX}chol"))
    g.node.append(helper.make_node("Sub", [f"{PREFIX}features", f"{PREFIX}mean"], [f"{PREFIX}centred"], name=f"{PREFIX}centre"))
    g.node.append(helper.make_node("MatMul", [f"{PREFIX}centred", f"{PREFIX}chol"], [f"{PREFIX}whitened"], name=f"{PREFIX}whiten"))
    if opset >= 18:
        g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{PREFIX}axes"))
        g.node.append(helper.make_node("ReduceSumSquare", [f"{PREFIX}whitened", f"{PREFIX}axes"], [f"{PREFIX}d2"],
                                       name=f"{PREFIX}d2", keepdims=1))
    else:
        g.node.append(helper.make_node("ReduceSumSquare", [f"{PREFIX}whitened"], [f"{PREFIX}d2"], name=f"{PREFIX}d2",
                                       axes=[1], keepdims=1))
    if ood.body is None:
        g.node.append(helper.make_node("Sqrt", [f"{PREFIX}d2"], [contract.OOD_OUTPUT_NAME], name=f"{PREFIX}distance"))
    else:  # ood_score = max(distance, T * exp(clip(features @ w + b - z0)))  (cxr.export.body_part)
        body = ood.body
        g.node.append(helper.make_node("Sqrt", [f"{PREFIX}d2"], [f"{PREFIX}dist"], name=f"{PREFIX}distance"))
        consts = {"bw": body.w.astype(np.float32).reshape(-1, 1), "bb": np.array(body.b - body.z0, np.float32),
                  "blo": np.array(-BODY_CLIP, np.float32), "bhi": np.array(BODY_CLIP, np.float32),
                  "bscale": np.array(body.scale, np.float32)}
        for k, v in consts.items():
            g.initializer.append(numpy_helper.from_array(v, f"{PREFIX}{k}"))
        steps = [("MatMul", [f"{PREFIX}features", f"{PREFIX}bw"], "blogit"),
                 ("Add", [f"{PREFIX}blogit", f"{PREFIX}bb"], "bcentred"),
                 ("Clip", [f"{PREFIX}bcentred", f"{PREFIX}blo", f"{PREFIX}bhi"], "bclipped"),
                 ("Exp", [f"{PREFIX}bclipped"], "bexp"),
                 ("Mul", [f"{PREFIX}bexp", f"{PREFIX}bscale"], "bscore")]
        for op, inputs, out in steps:
            g.node.append(helper.make_node(op, inputs, [f"{PREFIX}{out}"], name=f"{PREFIX}{out}"))
        g.node.append(helper.make_node("Max", [f"{PREFIX}dist", f"{PREFIX}bscore"], [contract.OOD_OUTPUT_NAME],
                                       name=f"{PREFIX}max"))
    g.output.append(helper.make_tensor_value_info(contract.OOD_OUTPUT_NAME, TensorProto.FLOAT, [contract.BATCH_DIM, 1]))
    onnx.checker.check_model(m)
    return m


def _rank(model, tensor: str) -> int:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name == tensor:
            return len(vi.type.tensor_type.shape.dim)
    raise CxrError(f"cannot infer the rank of {tensor}")


@dataclass(frozen=True)
class OodReport:
    """What the fit measured (stored in the model card)."""

    taps: tuple[str, ...]
    features: int
    shrinkage: float
    n_train: int
    threshold: float
    pass_rate_target: float
    per_set_pass_rate: float
    flagged: dict[str, float]
    n: dict[str, int]
    parity_max_rel_diff: float
    body_part: dict | None = None
    #: The training films scored by fits that did not see them (:func:`unseen_scores`): name -> kind, source,
    #: films, the pass rate the threshold keeps, and the share flagged at it.
    unseen: dict[str, dict] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OodFeatures:
    """What a fit saw, kept for later refits at a site (``cxr adapt``): the tapped features of the training
    images and of each set of real chest X-rays, and the fit itself."""

    train: np.ndarray = field(repr=False)
    real: dict[str, np.ndarray] = field(repr=False)
    fit: OodFit = field(repr=False)


def build(
    onnx_path: Path, train_images: np.ndarray, real_sets: dict[str, np.ndarray], *, out_path: Path | None = None,
    layers: tuple[str, ...] | None = None, weights: np.ndarray | None = None, non_chest: NonChest | None = None,
    sources: tuple[str, ...] | None = None, patients: tuple[str, ...] | None = None,
) -> tuple[OodReport, OodFeatures]:
    """Fit the OOD head for the ONNX at ``onnx_path`` and write the model with it (in place by default).

    Args:
        onnx_path: The model (with or without a previous OOD head).
        train_images: Training-side contract images (mean and covariance).
        real_sets: Held-out real chest X-rays by name; the first is the
            validation set that picks the shrinkage; the threshold keeps
            :data:`PASS_RATE` of each set.
        out_path: Where to write (default: ``onnx_path``).
        layers: Keras layer names to tap (default: by architecture, :data:`TAPS`).
        weights: Per training image weights of the mean and covariance (default equal).
        non_chest: Radiographs of other body parts and corpus inputs: fits the body-part check folded into the
            score (:mod:`cxr.export.body_part`); ``None``: the distance alone.
        sources, patients: Per training image; with them the threshold also keeps the films of new patients and
            of a new hospital (:func:`unseen_scores`).

    Raises:
        ExportValidationError: The graph's ``ood_score`` disagrees with the float64 reference.
    """
    base = strip(onnx_path)
    taps = find_taps(base, layers)
    extractor = FeatureExtractor(base, taps)
    f_train = extractor(train_images)
    feats = {k: extractor(v) for k, v in real_sets.items()}
    first = next(iter(feats))
    ood = fit(f_train, feats[first], taps, weights)
    ref = {k: ood.score(f) for k, f in feats.items()}
    unseen = ([] if sources is None or patients is None
              else unseen_scores(f_train, sources, patients, ood.shrinkage))
    body_report = None
    if non_chest is None:
        threshold = choose_threshold(ref, unseen={u.name: (u.distances, u.pass_rate) for u in unseen})
    else:
        from cxr.export import body_part

        f_non = extractor(non_chest.images)
        w = np.ones(len(f_train)) if weights is None else np.asarray(weights, np.float64)
        chest_select = disjoint(feats)
        head = body_part.fit(f_train, w, f_non[non_chest.fitting], chest_select, scale=1.0)
        # a film the body-part check refuses counts as refused when the distance threshold is chosen, so the
        # two checks together keep the pass rates
        masked = {k: np.where(head.logit(f) > head.z0, np.inf, ref[k]) for k, f in feats.items()}
        if unseen:  # the same for the training films the body-part check refuses
            refused = head.logit(f_train) > head.z0
            src = np.asarray(sources)
            unseen = [_counting_refused(u, refused[src == u.source]) for u in unseen]
        threshold = choose_threshold(masked, unseen={u.name: (u.distances, u.pass_rate) for u in unseen})
        if not np.isfinite(threshold):
            raise CxrError("the body-part check alone refuses more real chest films than the pass rates allow")
        ood = replace(ood, body=replace(head, scale=threshold))
        ref = {k: ood.score(f) for k, f in feats.items()}
        kinds = np.array(non_chest.kinds)
        body_report = {
            "method": "logistic regression on the OOD head's features: other body parts and corpus inputs "
                      "against the training chest films (cxr.export.body_part)",
            "cut": head.z0, "chest_pass": body_part.CHEST_PASS, "l2": body_part.L2,
            "fitted_on": {k: int(((kinds == k) & non_chest.fitting).sum()) for k in sorted(set(non_chest.kinds))},
            "validation": body_part.validate(f_train, w, chest_select, non_chest, f_non, scale=threshold),
            "refused_by_served_score": {k: float(np.mean(ood.score(f_non[kinds == k]) > threshold))
                                        for k in sorted(set(non_chest.kinds))},
        }
    model = attach(base, ood)
    out_path = Path(out_path or onnx_path)
    import onnx

    onnx.save(model, str(out_path))
    # parity, on every held-out image: the graph's ood_score against the float64 distance of the features that
    # same graph computed (exposed here as an extra output), so the head's arithmetic is checked tightly. The
    # tapped extractor's features, on which the threshold was chosen, round differently from the served graph's
    # fused kernels (about 5e-6 relative for the compact model, up to about 1e-3 behind InceptionV3's convolutions);
    # the threshold sits just above a kept score, so an image at it may flip: no decision-level check here.
    from onnx import TensorProto, helper

    from cxr.core.ort_session import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(f"{PREFIX}features", TensorProto.FLOAT, None))
    sess = make_session(probe.SerializeToString())
    worst = 0.0
    failures = []
    for imgs in real_sets.values():
        runs = [sess.run([contract.OOD_OUTPUT_NAME, f"{PREFIX}features"], {contract.INPUT_NAME: imgs[i : i + 128]})
                for i in range(0, len(imgs), 128)]
        got = np.concatenate([r[0] for r in runs])
        if got.shape != (len(imgs), 1):
            failures.append(f"ood_score shape {got.shape} != ({len(imgs)}, 1)")
            continue
        own = ood.score(np.concatenate([r[1] for r in runs]))
        rel = np.abs(got[:, 0] - own) / np.maximum(1.0, np.abs(own))
        worst = max(worst, float(rel.max()))
    if worst > OOD_RTOL:
        failures.append(f"ood_score max relative difference {worst:.3g} > {OOD_RTOL:g}")
    if failures:
        raise ExportValidationError(failures)
    flagged = {k: float(np.mean(v > threshold)) for k, v in ref.items()}
    logger.info("OOD head: %d features, shrinkage %.3g, threshold %.3f, flagged %s", len(ood.mean), ood.shrinkage,
                threshold, flagged)
    report = OodReport(taps=taps, features=len(ood.mean), shrinkage=ood.shrinkage, n_train=ood.n_train,
                       threshold=threshold, pass_rate_target=PASS_RATE, per_set_pass_rate=PER_SET_PASS_RATE,
                       flagged=flagged,
                       n={k: len(v) for k, v in real_sets.items()}, parity_max_rel_diff=worst, body_part=body_report,
                       unseen={u.name: {"kind": u.kind, "source": u.source, "n": len(u.distances),
                                        "pass_rate": u.pass_rate,
                                        "flagged": float(np.mean(u.distances > threshold))} for u in unseen})
    return report, OodFeatures(f_train, feats, ood)
