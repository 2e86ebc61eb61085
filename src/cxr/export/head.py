"""The classifier head inside an exported ONNX graph, read and written as numbers.

Every architecture ends the same way (:func:`cxr.train.models._head`): the
global-average-pooled features ``g`` go through ``Dense(128, relu)``, the
``logit`` layer, the probability scaling baked in at export (``Mul``, ``Add``)
and a ``Sigmoid``::

    probability = sigmoid(scale * (relu(g @ W1 + b1) @ W2 + b2) + bias)

:func:`read` follows that chain from the GAP tensor and returns the weights;
:func:`write` returns a copy of the graph with new values for them. ``cxr
adapt`` fine-tunes the head this way at a hospital, from the served ONNX alone:
no Keras model, no TensorFlow, no network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError


@dataclass(frozen=True)
class HeadWeights:
    """``W1 (p, h)``, ``b1 (h,)``, ``W2 (h, 1)``, ``b2 (1,)`` and the scalar probability scaling."""

    w1: np.ndarray = field(repr=False)
    b1: np.ndarray = field(repr=False)
    w2: np.ndarray = field(repr=False)
    b2: np.ndarray = field(repr=False)
    scale: float = 1.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        p, h = self.w1.shape
        if self.b1.shape != (h,) or self.w2.shape != (h, 1) or self.b2.shape != (1,):
            raise ValueError(f"head shapes do not chain: {self.w1.shape} {self.b1.shape} {self.w2.shape} {self.b2.shape}")
        for name in ("w1", "b1", "w2", "b2"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"head weight {name} holds NaN or Inf")

    def logits(self, gap: np.ndarray) -> np.ndarray:
        """Unscaled logits ``(N,)`` of GAP features ``(N, p)``."""
        hidden = np.maximum(np.asarray(gap, np.float64) @ self.w1 + self.b1, 0.0)
        return (hidden @ self.w2 + self.b2)[:, 0]

    def probability(self, gap: np.ndarray) -> np.ndarray:
        """The served probability ``(N,)``."""
        z = self.scale * self.logits(gap) + self.bias
        return 1.0 / (1.0 + np.exp(-z))


#: The ops of the chain after the GAP tensor, in order: Dense MatMul, bias Add, Relu, logit MatMul, bias Add,
#: scaling Mul, scaling Add, Sigmoid.
_CHAIN = ("MatMul", "Add", "Relu", "MatMul", "Add", "Mul", "Add", "Sigmoid")


def _chain(model, gap_tensor: str):
    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes, t = [], gap_tensor
    for op in _CHAIN:
        nxt = [n for n in consumers.get(t, []) if n.op_type == op]
        if len(nxt) != 1:
            raise CxrError(f"the head after {gap_tensor} is not Dense-ReLU-Dense-scale-Sigmoid (no single {op} after {t})")
        nodes.append(nxt[0])
        t = nxt[0].output[0]
    if t != contract.OUTPUT_NAME:
        raise CxrError(f"the head ends in {t}, not {contract.OUTPUT_NAME}")
    return nodes


def _const(model, node, inputs: tuple[str, ...]) -> str:
    names = {i.name for i in model.graph.initializer}
    hits = [i for i in node.input if i in names and i not in inputs]
    if len(hits) != 1:
        raise CxrError(f"node {node.name}: expected one weight initializer, found {hits}")
    return hits[0]


def _names(model, gap_tensor: str) -> dict[str, str]:
    nodes = _chain(model, gap_tensor)
    flow = {gap_tensor, *(n.output[0] for n in nodes)}
    keys = ("w1", "b1", None, "w2", "b2", "scale", "bias", None)
    return {k: _const(model, n, tuple(flow)) for k, n in zip(keys, nodes) if k}


def read(model, gap_tensor: str) -> HeadWeights:
    """The head's weights, following the chain from ``gap_tensor`` (the OOD head's first tap)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    v = {k: numpy_helper.to_array(inits[n]).astype(np.float64) for k, n in _names(model, gap_tensor).items()}
    return HeadWeights(v["w1"], v["b1"].reshape(-1), v["w2"].reshape(-1, 1), v["b2"].reshape(-1),
                       float(v["scale"].reshape(-1)[0]), float(v["bias"].reshape(-1)[0]))


def write(model, gap_tensor: str, weights: HeadWeights):
    """A copy of ``model`` with ``weights`` in the head (each initializer keeps its shape and dtype)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = _names(m, gap_tensor)
    values = {"w1": weights.w1, "b1": weights.b1, "w2": weights.w2, "b2": weights.b2,
              "scale": np.float64(weights.scale), "bias": np.float64(weights.bias)}
    for init in m.graph.initializer:
        for key, name in names.items():
            if init.name == name:
                old = numpy_helper.to_array(init)
                new = np.asarray(values[key]).reshape(old.shape).astype(old.dtype)
                init.CopyFrom(numpy_helper.from_array(new, name))
    onnx.checker.check_model(m)
    return m
