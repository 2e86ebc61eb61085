"""Naming and surgery of the served ONNX graph shared by its builder (export) and its readers (client, train).

The OOD head that :mod:`cxr.export.ood_head` appends is marked by :data:`OOD_PREFIX` on every node and
initializer, so a reader can take it off again (Grad-CAM and parameter counts work on the base graph).
"""

from __future__ import annotations

from pathlib import Path

from cxr.core import contract

#: Prefix of every node and initializer the OOD head adds (so it can be found and replaced).
OOD_PREFIX = "ood/"


def load(model: Path | object):
    """An ``onnx.ModelProto`` from a path, or the given one."""
    import onnx

    return onnx.load(str(model)) if isinstance(model, (str, Path)) else model


def is_relu6(node, constants: dict) -> bool:
    """Whether ``node`` is ReLU6 (EfficientNet-Lite's activation): a ``Clip`` whose bounds are the constants 0 and 6.
    ``constants``: the graph's initializers by name, as arrays or as ``onnx.TensorProto``."""
    if node.op_type != "Clip" or len(node.input) != 3 or not all(i in constants for i in node.input[1:]):
        return False
    from onnx import TensorProto, numpy_helper

    bounds = [constants[i] for i in node.input[1:]]
    return [float(numpy_helper.to_array(b) if isinstance(b, TensorProto) else b) for b in bounds] == [0.0, 6.0]


def strip_ood(model):
    """A copy of ``model`` without any OOD head (the base graph with its one ``probability`` output)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(load(model))
    g = m.graph
    keep = [n for n in g.node if not n.name.startswith(OOD_PREFIX)]
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if not i.name.startswith(OOD_PREFIX)]
    del g.initializer[:]
    g.initializer.extend(inits)
    outs = [o for o in g.output if o.name != contract.OOD_OUTPUT_NAME]
    del g.output[:]
    g.output.extend(outs)
    return m


def base_parameter_count(model) -> int:
    """Number of weights in the graph, the OOD head's excluded."""
    from onnx import numpy_helper

    graph = load(model).graph
    return int(sum(numpy_helper.to_array(t).size for t in graph.initializer if not t.name.startswith(OOD_PREFIX)))
