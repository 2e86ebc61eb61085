"""Adapting the features at a hospital: fine-tune the network's last convolutional block with its head.

A hospital has the served ONNX graph and its own films. The last block (the chain of ``Conv``/``Relu`` nodes that
feeds the global average pool in front of the head; or the whole chain, from the normalised image on) is found in
the graph (:func:`find_block`); its input activations are computed once for every site film (:func:`block_inputs`),
and the block and the head are then trained on them in TensorFlow (:func:`finetune_block`): when the block starts
at the image, each batch of the site's films is augmented (small rotations, shifts and zooms, :func:`affine`);
class-balanced log-loss on the adapt part's labels,
distillation towards the base model's answers (on the kit's replay activations when the kit carries them, else on
the site's own films), and an L2 pull towards the base weights. How far it goes (the epoch) is chosen by ROC AUC on
the calibrate part, never the audit part.

The adapted block is written as a *copy* beside the original (:func:`write_block`): the head reads the copy,
while the out-of-distribution head keeps reading the original block, so the OOD reference and the adapt kit's
features stay valid. Graphs whose last block is not a plain Conv/ReLU chain (e.g. InceptionV3's mixed blocks) get
``None`` from :func:`find_block` and adapt their head only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from cxr.core import contract
from cxr.core.graph import is_relu6
from cxr.export.head import HeadWeights

logger = logging.getLogger(__name__)

#: Suffix of the adapted copy's node, tensor and initializer names.
SUFFIX = "_site"


@dataclass(frozen=True)
class Block:
    """The last block of a graph: ``input`` -> (Conv, Relu)* -> GlobalAveragePool [-> Squeeze] = ``gap_tensor``.

    Attributes:
        input: Tensor feeding the block.
        nodes: Node names of the chain, in order (Conv, Relu, ..., GlobalAveragePool[, Squeeze]).
        convs: Conv node names, in order, with their (weight, bias) initializer names.
        gap_tensor: The head's input (the OOD head's first tap).
        ops: The op types before the pool, in order (Conv, Relu, Clip (ReLU6), MaxPool), as the trainer runs them.
        strides: Each convolution's stride: 1 for a 'same' convolution, k for a k x k stride-k patch convolution
            without padding (a stem). Empty: all 1.
    """

    input: str
    nodes: tuple[str, ...]
    convs: tuple[tuple[str, str, str], ...]
    gap_tensor: str
    ops: tuple[str, ...] = ()
    strides: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.convs:
            raise ValueError("a block has at least one convolution")
        if self.strides and (len(self.strides) != len(self.convs) or min(self.strides) < 1):
            raise ValueError("one stride >= 1 per convolution")


def _pool_ok(node) -> bool:
    att = {a.name: list(a.ints) for a in node.attribute}
    return (att.get("kernel_shape") == [2, 2] and att.get("strides") == [2, 2] and not any(att.get("pads", []))
            and not any(a.name in ("ceil_mode", "auto_pad") and (a.i or a.s) for a in node.attribute))


def _conv_stride(node, inits: set[str]) -> int | None:
    """1 for a stride-1 'same' convolution with an odd square kernel, k for a k x k stride-k convolution without
    padding (a patch stem); ``None`` for anything else (the trainer runs only these two)."""
    if not (len(node.input) == 3 and node.input[1] in inits and node.input[2] in inits):
        return None
    att = {a.name: list(a.ints) for a in node.attribute}
    k = att.get("kernel_shape", [])
    if (len(k) != 2 or k[0] != k[1] or att.get("dilations", [1, 1]) != [1, 1] or any(
            a.name == "group" and a.i not in (0, 1) for a in node.attribute)
            or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in node.attribute)):
        return None
    strides, pads = att.get("strides", [1, 1]), att.get("pads", [0] * 4)
    if strides == [1, 1] and k[0] % 2 == 1 and pads == [k[0] // 2] * 4:
        return 1
    if strides == k and not any(pads):
        return k[0]
    return None


#: ``find_block``'s ``convs`` for the whole chain: every convolution from the block's start to the pool.
WHOLE = 0


def find_block(model, gap_tensor: str, convs: int = 2) -> Block | None:
    """The last ``convs`` convolutions before ``gap_tensor`` as a trainable chain (each convolution followed by a
    ReLU, a ReLU6 or nothing (a linear bottleneck, as EfficientNet's projections), 2x2 max pools between them, stride
    1 'same' convolutions or a stride-k k x k patch convolution), or ``None`` when the graph does not end that way
    (a depthwise convolution ends it). ``convs=WHOLE``: every convolution the chain has (at least one)."""
    if convs == WHOLE:
        whole = None
        for count in range(1, 256):
            blk = find_block(model, gap_tensor, count)
            if blk is None:
                return whole
            whole = blk
        return whole
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    init_protos = {i.name: i for i in g.initializer}
    inits = set(init_protos)
    chain = []
    n = producer.get(gap_tensor)
    if n is not None and n.op_type == "Squeeze":
        chain.append(n)
        n = producer.get(n.input[0])
    if n is None or n.op_type != "GlobalAveragePool":
        return None
    chain.append(n)
    t = n.input[0]
    found: list[tuple[str, str, str]] = []
    strides: list[int] = []
    while t in producer and len(found) < convs:
        p = producer[t]
        if p.op_type == "Relu" or is_relu6(p, init_protos) or (p.op_type == "MaxPool" and _pool_ok(p)):
            chain.append(p)
        elif p.op_type == "Conv" and (stride := _conv_stride(p, inits)) is not None:
            chain.append(p)
            found.append((p.name, p.input[1], p.input[2]))
            strides.append(stride)
        else:
            break
        t = p.input[0]
    while chain[-1].op_type != "Conv" and chain[-1].op_type not in ("GlobalAveragePool", "Squeeze"):
        t = chain.pop().output[0]  # start at a convolution
    ops = [x.op_type for x in reversed(chain)]
    body = [o for o in ops[: ops.index("GlobalAveragePool")] if o != "MaxPool"]
    if len(found) < convs or body.count("Conv") != convs or not _conv_then_activation(body):
        return None  # the trainer's forward pass: convolutions, each with one activation or none, max pools between
    return Block(input=t, nodes=tuple(x.name for x in reversed(chain)), convs=tuple(reversed(found)),
                 gap_tensor=gap_tensor, ops=tuple(o for o in ops[: ops.index("GlobalAveragePool")]),
                 strides=tuple(reversed(strides)))


def _conv_then_activation(body: list[str]) -> bool:
    """``body`` starts with a convolution and has at most one activation after each."""
    if not body or body[0] != "Conv":
        return False
    return all(not (a in ("Relu", "Clip") and b in ("Relu", "Clip")) for a, b in zip(body, body[1:]))


def conv_weights(model, block: Block) -> list[tuple[np.ndarray, np.ndarray]]:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    return [(numpy_helper.to_array(inits[w]).astype(np.float32), numpy_helper.to_array(inits[b]).astype(np.float32))
            for _, w, b in block.convs]


def block_inputs(model, block: Block, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """The block's input activations ``(N, C, H, W)`` (float32) of uint8 images."""
    import onnx

    from cxr.core.ort_session import make_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(block.input, onnx.TensorProto.FLOAT, None))
    sess = make_session(m.SerializeToString())
    parts = [sess.run([block.input], {contract.INPUT_NAME: images[i : i + batch_size]})[0]
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class BlockFit:
    """A fine-tuned block and head, and how it was chosen.

    Attributes:
        convs: ``(weight OIHW, bias)`` of every convolution of the block.
        head: The head's weights.
        epoch: The epoch kept (0: the base weights).
        history: ``{"epoch", "loss", "calibrate_auc"}`` per epoch (epoch 0 included).
        settings: Learning rate, distillation weight, L2 pull, batch size, epochs.
    """

    convs: tuple = field(repr=False)
    head: HeadWeights = field(repr=False)
    epoch: int = 0
    history: tuple = ()
    settings: dict = field(default_factory=dict)


def affine(rng: np.random.Generator, n: int, size: tuple[int, int], *, degrees: float = 10.0, shift: float = 0.06,
           zoom: float = 0.1) -> np.ndarray:
    """``n`` random projective transforms ``(n, 8)`` (TensorFlow's layout: output pixel -> input pixel) of an image
    of ``size`` (height, width): a rotation within +-``degrees`` and a zoom within 1 +- ``zoom`` about the centre,
    and a shift within +-``shift`` of the size. Drawn from ``rng``: one seed, one sequence."""
    h, w = size
    theta = np.deg2rad(rng.uniform(-degrees, degrees, n))
    s = rng.uniform(1 - zoom, 1 + zoom, n)
    tx, ty = rng.uniform(-shift, shift, n) * w, rng.uniform(-shift, shift, n) * h
    cx, cy = (w - 1) / 2, (h - 1) / 2
    a0, a1 = np.cos(theta) / s, -np.sin(theta) / s
    b0, b1 = np.sin(theta) / s, np.cos(theta) / s
    a2 = cx - a0 * cx - a1 * cy + tx
    b2 = cy - b0 * cx - b1 * cy + ty
    z = np.zeros(n)
    return np.stack([a0, a1, a2, b0, b1, b2, z, z], axis=1).astype(np.float32)


def _forward(tf, a, convs, head, scale: float, bias: float, ops: tuple[str, ...] = (), strides: tuple[int, ...] = ()):
    h = a
    k = 0
    for op in ops or ("Conv", "Relu") * len(convs):
        if op == "Conv":
            st = strides[k] if strides else 1
            h = tf.nn.conv2d(h, convs[k][0], strides=st, padding="SAME" if st == 1 else "VALID") + convs[k][1]
            k += 1
        elif op == "Relu":
            h = tf.nn.relu(h)
        elif op == "Clip":
            h = tf.nn.relu6(h)
        else:
            h = tf.nn.max_pool2d(h, 2, 2, "VALID")
    g = tf.reduce_mean(h, axis=(1, 2))
    hidden = tf.nn.relu(tf.matmul(g, head[0]) + head[1])
    z = tf.matmul(hidden, head[2])[:, 0] + head[3][0]
    return scale * z + bias


def finetune_block(acts: np.ndarray, y: np.ndarray, teacher_acts: np.ndarray, teacher: np.ndarray,
                   base_convs: list[tuple[np.ndarray, np.ndarray]], base_head: HeadWeights, *,
                   val_acts: np.ndarray, val_y: np.ndarray, epochs: int = 20, learning_rate: float = 3e-4,
                   distill: float = 0.5, l2: float = 1e-3, batch_size: int = 32, seed: int = 0,
                   progress: bool = False, ops: tuple[str, ...] = (), strides: tuple[int, ...] = (),
                   augment: bool = False) -> BlockFit:
    """Train the block and head on ``acts`` (block inputs, NCHW) with labels ``y``, distilling ``teacher``
    (the base model's probabilities) on ``teacher_acts``; keep the epoch with the best ROC AUC on ``val_*``
    (the calibrate part; epoch 0 = the base weights, so adapting never makes the calibrate AUC worse).
    ``augment``: every batch of ``acts`` goes through a random :func:`affine` transform first (meant for a block
    that starts at the image; the teacher's and the calibrate part's activations are never transformed)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from tqdm import tqdm

    from cxr.train import metrics

    tf.random.set_seed(seed)
    # one sample, one split, one seed: one model (tests rely on it); restored after, as the process found it
    from tensorflow.python.framework import config as tf_config  # the public API can enable, not disable

    was_deterministic = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    rng = np.random.default_rng(seed)
    nhwc = lambda a: tf.constant(np.transpose(a, (0, 2, 3, 1)))  # noqa: E731
    a_site, a_teach, a_val = nhwc(acts), nhwc(teacher_acts), nhwc(val_acts)
    convs0 = [(np.transpose(w, (2, 3, 1, 0)), b) for w, b in base_convs]
    head0 = [base_head.w1, base_head.b1, base_head.w2, base_head.b2]
    conv_vars = [(tf.Variable(w, dtype=tf.float32), tf.Variable(b, dtype=tf.float32)) for w, b in convs0]
    head_vars = [tf.Variable(np.asarray(v, np.float32)) for v in head0]
    anchors = [tf.constant(np.asarray(v, np.float32)) for pair in convs0 for v in pair] + [
        tf.constant(np.asarray(v, np.float32)) for v in head0]
    variables = [v for pair in conv_vars for v in pair] + head_vars
    opt = tf.keras.optimizers.Adam(learning_rate)
    y = np.asarray(y, np.float32)
    w_cls = np.where(y == 1, 0.5 / max(1, (y == 1).sum()), 0.5 / max(1, (y == 0).sum())).astype(np.float32) * len(y)
    t_all = np.asarray(teacher, np.float32)
    bce = tf.keras.losses.binary_crossentropy

    def val_auc() -> float:
        s = _forward(tf, a_val, conv_vars, head_vars, base_head.scale, base_head.bias, ops, strides).numpy().astype(np.float64)
        return float(metrics.roc_auc(val_y, 1.0 / (1.0 + np.exp(-np.clip(s, -50, 50)))))

    def snapshot() -> tuple:
        convs = tuple((np.transpose(w.numpy(), (3, 2, 0, 1)), b.numpy()) for w, b in conv_vars)
        w1, b1, w2, b2 = (v.numpy().astype(np.float64) for v in head_vars)
        head = HeadWeights(w1, b1, w2, b2, base_head.scale, base_head.bias)
        return convs, head

    try:
        history: list[dict] = [{"epoch": 0, "loss": None, "calibrate_auc": val_auc()}]  # no step taken: no loss
        best = (history[0]["calibrate_auc"], 0, snapshot())
        n = len(y)
        steps = max(1, int(np.ceil(n / batch_size)))
        bar = tqdm(total=epochs * steps, desc="adapt block", unit="step", disable=not progress)
        for epoch in range(1, epochs + 1):
            order = rng.permutation(n)
            losses = []
            for k in range(steps):
                idx = order[k * batch_size : (k + 1) * batch_size]
                t_idx = rng.integers(0, len(t_all), len(idx))
                batch = tf.gather(a_site, idx)
                if augment:
                    batch = tf.raw_ops.ImageProjectiveTransformV3(
                        images=batch, transforms=affine(rng, len(idx), tuple(batch.shape[1:3])),
                        output_shape=tf.constant(batch.shape[1:3], tf.int32), fill_value=0.0, interpolation="BILINEAR",
                        fill_mode="NEAREST")
                with tf.GradientTape() as tape:
                    s = _forward(tf, batch, conv_vars, head_vars, base_head.scale, base_head.bias, ops, strides)
                    q = tf.sigmoid(s)
                    loss = tf.reduce_mean(w_cls[idx] * bce(y[idx][:, None], q[:, None]))
                    if distill > 0:
                        st = _forward(tf, tf.gather(a_teach, t_idx), conv_vars, head_vars, base_head.scale, base_head.bias, ops, strides)
                        loss += distill * tf.reduce_mean(bce(t_all[t_idx][:, None], tf.sigmoid(st)[:, None]))
                    if l2 > 0:
                        loss += l2 * tf.add_n([tf.reduce_sum(tf.square(v - a0)) for v, a0 in zip(variables, anchors)])
                grads = tape.gradient(loss, variables)
                opt.apply_gradients(zip(grads, variables))
                losses.append(float(loss))
                bar.update(1)
            auc = val_auc()
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "calibrate_auc": auc})
            if auc > best[0]:
                best = (auc, epoch, snapshot())
        bar.close()
    finally:
        if not was_deterministic:
            tf_config.disable_op_determinism()
    convs, head = best[2]
    return BlockFit(convs=convs, head=head, epoch=best[1], history=tuple(history),
                    settings={"learning_rate": learning_rate, "distill": distill, "l2": l2, "batch_size": batch_size,
                              "epochs": epochs, "seed": seed, "convs": len(base_convs), "augment": augment})


def write_block(model, block: Block, fit: BlockFit):
    """A copy of ``model`` where the head reads an adapted copy of the block (the original stays for the OOD
    head), with ``fit``'s weights in the copy and the head."""
    import onnx
    from onnx import numpy_helper

    from cxr.export import head as head_mod

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    by_name = {n.name: n for n in g.node}
    renamed: dict[str, str] = {}
    new_inits = []
    conv_values = {name: pair for (name, _, _), pair in zip(block.convs, fit.convs)}
    copies = []
    for name in block.nodes:
        src = by_name[name]
        c = onnx.NodeProto()
        c.CopyFrom(src)
        c.name = src.name + SUFFIX
        del c.input[:]
        ins = list(src.input)
        if src.op_type == "Conv":
            w, b = conv_values[name]
            wn, bn = ins[1] + SUFFIX, ins[2] + SUFFIX
            new_inits += [numpy_helper.from_array(w.astype(np.float32), wn), numpy_helper.from_array(b.astype(np.float32), bn)]
            ins = [renamed.get(ins[0], ins[0]), wn, bn]
        else:
            ins = [renamed.get(i, i) for i in ins]
        c.input.extend(ins)
        del c.output[:]
        for o in src.output:
            renamed[o] = o + SUFFIX
            c.output.append(o + SUFFIX)
        copies.append(c)
    new_gap = renamed[block.gap_tensor]
    consumers = [n for n in g.node if block.gap_tensor in n.input and n.op_type == "MatMul"]
    if len(consumers) != 1:
        raise ValueError(f"expected the head's one MatMul after {block.gap_tensor}")
    head_first = consumers[0]
    head_first.input[list(head_first.input).index(block.gap_tensor)] = new_gap
    nodes = list(g.node)
    at = nodes.index(head_first)
    del g.node[:]
    g.node.extend(nodes[:at] + copies + nodes[at:])
    g.initializer.extend(new_inits)
    return head_mod.write(m, new_gap, fit.head)
