"""Grad-CAM for the model the server is serving, without TensorFlow.

The explanation is computed from the served ONNX file itself: its sha256 must
equal the one the server publishes (config parameter ``sha256``), otherwise
the heatmap is *unavailable* and the caller says so. No separate explainer
model is kept that could drift from the served one.

How: the served graph is run with one convolutional stage's activations ``A``
as an extra output, plus the activations of every later layer. The gradient
of the pneumonia logit with respect to ``A`` is then computed exactly in numpy
by back-propagating through the graph's own tail (max-pool, 3x3 convolutions
with their folded batch-norm, ReLU, global average pooling, the dense head),
whose weights are read from the ONNX initializers. Grad-CAM (Selvaraju et al.
2017) weighs each channel by its mean gradient: ``relu(sum_c alpha_c A_c)``.
The calibration ``sigmoid(scale * z + bias)`` has ``scale > 0``, so the map
explains the served probability too.

Only positive evidence is drawn (the ReLU), and callers show it only for a
Pneumonia answer. The stage is chosen by measurement (``cxr explain-eval``,
``docs/model/gradcam.md``): the 14x14 stage of the compact CNN (``s2b_relu``)
against the 7x7 last stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr.core import contract, imaging
from cxr.core.errors import CxrError, ExitCode
from cxr.core.graph import is_relu6

logger = logging.getLogger(__name__)

#: Layer whose activations are explained, per architecture (chosen by `cxr explain-eval`).
DEFAULT_LAYER = {"compact_cnn": "s3b_relu", "inception_v3": "mixed10", "efficientnet_lite0": "head_relu"}
#: Every layer the compact CNN can be explained at, coarse to fine.
COMPACT_LAYERS = ("s3b_relu", "s2b_relu", "s1b_relu")
#: EfficientNet-Lite0's: the head convolution's activations and the last block's depthwise ones, both 7x7 (the
#: gradient is taken in the served graph, which has no path from an earlier stage without a residual Add).
EFFICIENTNET_LAYERS = ("head_relu", "b15_dw_relu")
#: The layers ``cxr explain-eval`` compares, per architecture.
LAYERS = {"compact_cnn": COMPACT_LAYERS, "efficientnet_lite0": EFFICIENTNET_LAYERS}


def architecture(model: Path | Any) -> str | None:
    """The architecture (a key of :data:`DEFAULT_LAYER`) whose name the graph's nodes carry, else ``None``;
    ``model`` is a loaded ONNX model or a model folder."""
    if isinstance(model, Path):
        import onnx

        from cxr.core.model_dir import ModelDir

        model = onnx.load(str(ModelDir(model).onnx_path()))
    return next((a for a in DEFAULT_LAYER if any(a in n.name for n in model.graph.node)), None)


class ExplanationUnavailable(CxrError):
    """No heatmap can be computed for the served model (files missing, or not the served model)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class _Op:
    kind: str
    output: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    kernel: int = 0
    pad: int = 0


def _chain(model, start: str, end: str) -> list[_Op]:
    """The sequential ops from tensor ``start`` to tensor ``end``, with their initializers."""
    from onnx import helper, numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ops: list[_Op] = []
    cur = start
    while cur != end:
        nxt = [n for n in consumers.get(cur, []) if not n.name.startswith("ood/")]
        if len(nxt) != 1:
            raise CxrError(f"Grad-CAM: the graph branches after {cur}; only sequential tails are supported")
        n = nxt[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        consts = [init[i] for i in n.input if i in init]
        if n.op_type == "Conv":
            if attrs.get("group", 1) != 1 or list(attrs.get("strides", [1, 1])) != [1, 1]:
                raise CxrError(f"Grad-CAM: unsupported convolution {n.name}")
            w = consts[0].astype(np.float64)
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            if len(set(pads)) != 1 or w.shape[2] != w.shape[3] or w.shape[2] != 2 * pads[0] + 1:
                raise CxrError(f"Grad-CAM: only 'same' square convolutions are supported ({n.name})")
            b = consts[1].astype(np.float64) if len(consts) > 1 else np.zeros(w.shape[0])
            ops.append(_Op("conv", n.output[0], w, b, kernel=w.shape[2], pad=pads[0]))
        elif n.op_type == "MaxPool":
            k = list(attrs["kernel_shape"])
            if k[0] != k[1] or list(attrs.get("strides", k)) != k:
                raise CxrError(f"Grad-CAM: unsupported pooling {n.name}")
            ops.append(_Op("maxpool", n.output[0], kernel=k[0]))
        elif n.op_type in ("Relu", "GlobalAveragePool"):
            ops.append(_Op(n.op_type.lower(), n.output[0]))
        elif is_relu6(n, init):
            ops.append(_Op("relu6", n.output[0]))  # EfficientNet-Lite's activation
        elif n.op_type in ("Squeeze", "Flatten", "Reshape"):
            ops.append(_Op("flatten", n.output[0]))
        elif n.op_type == "MatMul" and consts:
            ops.append(_Op("matmul", n.output[0], consts[0].astype(np.float64)))
        elif n.op_type == "Add" and consts:
            ops.append(_Op("add", n.output[0], bias=consts[0].astype(np.float64)))
        else:
            raise CxrError(f"Grad-CAM: unsupported op {n.op_type} ({n.name})")
        cur = n.output[0]
    return ops


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Stride-1 'same' convolution of ``x (C, H, W)`` with ``w (O, C, k, k)``."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))  # type: ignore[call-overload]  # (C, H, W, k, k)
    return np.einsum("ocij,chwij->ohw", w, win, optimize=True) + b[:, None, None]


def _conv_backward(dy: np.ndarray, w: np.ndarray, pad: int, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient with respect to the input of :func:`_conv`."""
    k = w.shape[2]
    _, h, wd = shape
    dxp = np.zeros((w.shape[1], h + 2 * pad, wd + 2 * pad))
    for i in range(k):
        for j in range(k):
            dxp[:, i : i + h, j : j + wd] += np.einsum("oc,ohw->chw", w[:, :, i, j], dy, optimize=True)
    return dxp[:, pad : pad + h, pad : pad + wd]


def _maxpool(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    c, h, w = x.shape
    blocks = x[:, : h // k * k, : w // k * k].reshape(c, h // k, k, w // k, k).transpose(0, 1, 3, 2, 4).reshape(c, h // k, w // k, k * k)
    arg = blocks.argmax(axis=-1)
    return np.take_along_axis(blocks, arg[..., None], axis=-1)[..., 0], arg


def _maxpool_backward(dy: np.ndarray, arg: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    c, h, w = shape
    oh, ow = dy.shape[1:]
    onehot = np.zeros((c, oh, ow, k * k))
    np.put_along_axis(onehot, arg[..., None], dy[..., None], axis=-1)
    dx = np.zeros(shape)
    dx[:, : oh * k, : ow * k] = onehot.reshape(c, oh, ow, k, k).transpose(0, 1, 3, 2, 4).reshape(c, oh * k, ow * k)
    return dx


class Tail:
    """Numpy forward and backward of the graph's sequential tail, from a stage's activations to the logit."""

    def __init__(self, ops: list[_Op]) -> None:
        self.ops = ops

    def forward(self, a: np.ndarray) -> tuple[float, list[tuple[_Op, Any]]]:
        """The logit for one image's activations ``a (C, H, W)``, and the cache for :meth:`backward`."""
        cache: list[tuple[_Op, Any]] = []
        x = a.astype(np.float64)
        for op in self.ops:
            cache.append((op, x))
            if op.kind == "conv":
                x = _conv(x, op.weight, op.bias, op.pad)  # type: ignore[arg-type]
            elif op.kind == "relu":
                x = np.maximum(x, 0)
            elif op.kind == "relu6":
                x = np.clip(x, 0, 6)
            elif op.kind == "maxpool":
                x, arg = _maxpool(x, op.kernel)
                cache[-1] = (op, (cache[-1][1], arg))
            elif op.kind == "globalaveragepool":
                x = x.mean(axis=(1, 2))
            elif op.kind == "flatten":
                x = x.reshape(-1)
            elif op.kind == "matmul":
                x = x @ op.weight  # type: ignore[operator]
            elif op.kind == "add":
                x = x + op.bias  # type: ignore[operator]
        return float(np.asarray(x).reshape(-1)[0]), cache

    def backward(self, cache: list[tuple[_Op, Any]]) -> np.ndarray:
        """d logit / d activations, shape of the stage's activations."""
        g: np.ndarray = np.ones(1)
        for op, x in reversed(cache):
            if op.kind == "conv":
                g = _conv_backward(g, op.weight, op.pad, x.shape)
            elif op.kind == "relu":
                g = g * (x > 0)
            elif op.kind == "relu6":
                g = g * ((x > 0) & (x < 6))
            elif op.kind == "maxpool":
                inp, arg = x
                g = _maxpool_backward(g, arg, op.kernel, inp.shape)
            elif op.kind == "globalaveragepool":
                g = np.broadcast_to(g[:, None, None] / (x.shape[1] * x.shape[2]), x.shape).copy()
            elif op.kind == "flatten":
                g = g.reshape(x.shape)
            elif op.kind == "matmul":
                g = op.weight @ g.reshape(-1)
            # add: gradient passes unchanged
        return g


def _logit_tensor(model) -> str:
    """The pre-calibration logit: walk back from the Sigmoid of ``probability`` through constant Mul/Add."""
    init = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer[contract.OUTPUT_NAME]
    if node.op_type != "Sigmoid":
        raise CxrError("Grad-CAM: the probability output is not a sigmoid")
    cur = node.input[0]
    while producer[cur].op_type in ("Mul", "Add") and any(i in init for i in producer[cur].input):
        nxt = [i for i in producer[cur].input if i not in init][0]
        if producer[nxt].op_type == "MatMul":  # the logit layer's bias add: stop before it is crossed
            break
        cur = nxt
    return cur


def _layer_tensor(model, layer: str) -> str:
    hits = [o for n in model.graph.node for o in n.output if f"/{layer}_1/" in o or f"/{layer}/" in o]
    if not hits:
        raise CxrError(f"Grad-CAM: no layer {layer!r} in the graph")
    return hits[-1]


class GradCam:
    """Grad-CAM heatmaps for the served model.

    Args:
        model_dir: The model's folder in the repository (``<repository>/<model>``).
        served_sha256: The sha256 the server publishes; the local file must match
            it (``None`` skips the check, for offline tools).
        layer: Layer to explain (default: by architecture, :data:`DEFAULT_LAYER`).

    Raises:
        ExplanationUnavailable: No model file, or not the served model.
    """

    def __init__(self, model_dir: Path, *, served_sha256: str | None, layer: str | None = None) -> None:
        import onnx

        from cxr.core.graph import strip_ood
        from cxr.core.integrity import sha256_file
        from cxr.core.model_dir import ModelDir
        from cxr.core.ort_session import make_session

        folder = ModelDir(Path(model_dir))
        if not folder.has_card():
            raise ExplanationUnavailable(f"no model files at {folder.path}")
        path = folder.onnx_path()
        if not path.exists():
            raise ExplanationUnavailable(f"no model file {path}")
        self.sha256 = sha256_file(path)
        if served_sha256 is not None and self.sha256 != served_sha256:
            raise ExplanationUnavailable(f"the local model file ({self.sha256[:12]}) is not the served model "
                                         f"({served_sha256[:12] or 'no sha256 published'})")
        base = strip_ood(onnx.load(str(path)))
        arch = architecture(base)
        measured = folder.card().explain
        if measured.get("sha256") != self.sha256:
            measured = {}  # measured on another file: no verdict
        #: The model-randomisation verdict of ``cxr explain-eval`` for this file (``None``: not measured).
        self.passes_check: bool | None = measured.get("passes_randomisation_check")
        self.check_note = ("" if self.passes_check is not False else
                           f"this map failed the model-randomisation check (correlation "
                           f"{measured['randomised_head_correlation']:.2f} with a randomised head, limit "
                           f"{measured['max_randomised_correlation']}): it shows where the film is structured more "
                           "than what the model used; read it with care")
        self.layer = layer or measured.get("layer") or (DEFAULT_LAYER[arch] if arch else "")
        if not self.layer:
            raise ExplanationUnavailable("unknown architecture: give the layer to explain")
        start = _layer_tensor(base, self.layer)
        end = _logit_tensor(base)
        try:
            self.tail = Tail(_chain(base, start, end))
        except CxrError as exc:
            raise ExplanationUnavailable(str(exc)) from None
        base.graph.output.append(onnx.helper.make_tensor_value_info(start, onnx.TensorProto.FLOAT, None))
        base.graph.output.append(onnx.helper.make_tensor_value_info(end, onnx.TensorProto.FLOAT, None))
        self._names = [start, end]
        self._session = make_session(base.SerializeToString())

    def with_random_head(self, seed: int = 0) -> GradCam:
        """A copy whose dense head (every matmul and bias of the tail after the last convolution) has random
        weights of the same scale: the model-randomisation sanity check of Adebayo et al. (2018)."""
        import copy

        rng = np.random.default_rng(seed)
        last_conv = max((i for i, op in enumerate(self.tail.ops) if op.kind == "conv"), default=-1)
        ops = []
        for i, op in enumerate(self.tail.ops):
            if i > last_conv and op.kind == "matmul":
                op = _Op(op.kind, op.output, rng.normal(0, op.weight.std(), op.weight.shape))  # type: ignore[union-attr]
            elif i > last_conv and op.kind == "add":
                op = _Op(op.kind, op.output, bias=rng.normal(0, op.bias.std() + 1e-3, op.bias.shape))  # type: ignore[union-attr]
            ops.append(op)
        other = copy.copy(self)
        other.tail = Tail(ops)
        return other

    def activations(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The stage's activations ``(C, h, w)`` and the graph's logit for one contract image."""
        batch = contract.validate_batch(image[None], name="image")
        a, z = self._session.run(self._names, {contract.INPUT_NAME: batch})
        return a[0].astype(np.float64), float(np.asarray(z).reshape(-1)[0])

    def cam(self, image: np.ndarray) -> np.ndarray:
        """The raw Grad-CAM map at the stage's resolution (``h, w``), >= 0, not normalised."""
        a, _ = self.activations(image)
        _, cache = self.tail.forward(a)
        grad = self.tail.backward(cache)
        alpha = grad.mean(axis=(1, 2))
        return np.maximum(np.tensordot(alpha, a, axes=1), 0)

    def heatmap(self, image: np.ndarray, size: tuple[int, int] = (contract.IMAGE_SIZE, contract.IMAGE_SIZE)) -> np.ndarray:
        """Grad-CAM in [0, 1] (positive evidence for pneumonia), float32 of shape ``(height, width)`` = ``size[::-1]``.

        ``size`` is ``(width, height)``: pass the original film's size to draw the map over the
        whole film with its aspect ratio (the model saw the film squashed to 224x224, so the
        map stretches back the same way).
        """
        cam = self.cam(image)
        if cam.max() > 0:
            cam = cam / cam.max()
        up = Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.Resampling.BICUBIC)
        return np.clip(np.asarray(up, dtype=np.float32), 0, 1)


def overlay(gray: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, floor: float = 0.2) -> np.ndarray:
    """Blend a heatmap over a 2-D grayscale film of the same size as RGB ``uint8``.

    Only evidence above ``floor`` (of the map's maximum) is tinted, from yellow to
    red; the rest of the film stays as it is.
    """
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim == 3:
        g = g[..., 0]
    if g.shape != heat.shape:
        raise ValueError(f"film {g.shape} and heatmap {heat.shape} differ in size")
    base = np.stack([g] * 3, axis=-1)
    t = np.clip((heat - floor) / (1 - floor), 0, 1)[..., None]
    colour = np.concatenate([np.ones_like(t), 1 - t, np.zeros_like(t)], axis=-1) * 255  # yellow -> red
    weight = alpha * np.sqrt(t)
    return np.clip(base * (1 - weight) + colour * weight, 0, 255).astype(np.uint8)


def film_for_display(source: str | Path, *, max_side: int = 1024) -> np.ndarray:
    """The whole film as 2-D uint8 grayscale at most ``max_side`` px, aspect ratio kept (no eligibility rules)."""
    gray, _, _ = imaging.decode_gray(source)
    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        gray = np.asarray(Image.fromarray(gray).resize((max(1, int(w * scale)), max(1, int(h * scale))),
                                                       Image.Resampling.BILINEAR))
    return gray
