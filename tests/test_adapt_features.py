"""Adapting the features: the last block found in the served graph, trained in TensorFlow on its input
activations, and written back as a copy that the head reads while the OOD head keeps the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from cxr.core import contract
from cxr.core.ort_session import make_session
from cxr.export import adapt_features as af
from cxr.export import adapt_kit, head, ood_head
from tests.conftest import SHIPPED_REPOSITORY

MODEL = SHIPPED_REPOSITORY / "pneumonia"


@pytest.fixture(scope="module")
def base():  # type: ignore[no-untyped-def]
    return ood_head.strip(onnx.load(str(MODEL / "1" / "model.onnx")))


@pytest.fixture(scope="module")
def tap() -> str:
    return adapt_kit.load(MODEL).taps[0]


def _images(n: int, seed: int = 0) -> np.ndarray:
    from tests.conftest import synthetic_xray

    size = (contract.IMAGE_SHAPE[1], contract.IMAGE_SHAPE[0])
    a = np.stack([np.asarray(synthetic_xray(seed + i, pneumonia=i % 2 == 1, size=size), np.uint8) for i in range(n)])
    return np.repeat(a[..., None], contract.IMAGE_SHAPE[2], axis=-1) if contract.IMAGE_SHAPE[2] > 1 else a[..., None]


def _served(model, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return make_session(model.SerializeToString()).run([contract.OUTPUT_NAME], {contract.INPUT_NAME: x})[0][:, 0]


def test_the_last_convolutions_are_found_in_the_graph(base, tap: str) -> None:  # type: ignore[no-untyped-def]
    two = af.find_block(base, tap, 2)
    four = af.find_block(base, tap, 4)
    assert two is not None and four is not None
    assert len(two.convs) == 2 and len(four.convs) == 4 and four.ops.count("MaxPool") == 1
    assert two.gap_tensor == tap and two.input != four.input
    assert af.find_block(base, tap, 50) is None  # the chain starts at the normalised image: no 50 convolutions
    assert af.find_block(base, contract.INPUT_NAME, 2) is None


def test_the_adapted_copy_serves_what_the_trainer_measured_and_the_ood_taps_stay(base, tap: str) -> None:  # type: ignore[no-untyped-def]
    x = _images(24)
    y = np.array([1 - i % 2 for i in range(24)])  # labels the base model gets wrong: training must move it
    blk = af.find_block(base, tap, 2)
    assert blk is not None
    acts = af.block_inputs(base, blk, x)
    w0 = head.read(base, tap)
    same = af.write_block(base, blk, af.BlockFit(convs=tuple(af.conv_weights(base, blk)), head=w0))
    assert _served(same, x) == pytest.approx(_served(base, x), abs=1e-5)  # the base weights copied: the same answers
    fit = af.finetune_block(acts, y, acts, _served(base, x), af.conv_weights(base, blk), w0, val_acts=acts, val_y=y,
                            epochs=3, learning_rate=3e-3, l2=0.0, distill=0.0, ops=blk.ops)
    assert [h["epoch"] for h in fit.history] == [0, 1, 2, 3] and fit.epoch > 0
    from tensorflow.python.framework import config as tf_config

    assert not tf_config.is_op_determinism_enabled()  # the process's TensorFlow is left as it was found
    adapted = af.write_block(base, blk, fit)
    from cxr.train import metrics

    served = _served(adapted, x)
    assert metrics.roc_auc(y, served) == pytest.approx(fit.history[fit.epoch]["calibrate_auc"], abs=1e-6)
    assert np.abs(served - _served(base, x)).max() > 1e-3
    taps = adapt_kit.load(MODEL).taps
    assert ood_head.FeatureExtractor(adapted, taps, log=False)(x) == pytest.approx(
        ood_head.FeatureExtractor(base, taps, log=False)(x), rel=1e-5)  # the OOD head reads the original block


def test_the_whole_chain_starts_at_the_image_with_the_patch_stem(base, tap: str) -> None:  # type: ignore[no-untyped-def]
    whole = af.find_block(base, tap, af.WHOLE)
    assert whole is not None and whole == af.find_block(base, tap, len(whole.convs))
    assert af.find_block(base, tap, len(whole.convs) + 1) is None
    assert whole.strides[0] == 4 and set(whole.strides[1:]) == {1}  # the compact CNN's 4x4 stride-4 stem
    acts = af.block_inputs(base, whole, _images(2))
    assert acts.shape[1:] == (contract.IMAGE_SHAPE[2], *contract.IMAGE_SHAPE[:2])  # the normalised image
    assert af.find_block(base, contract.INPUT_NAME, af.WHOLE) is None


def test_the_whole_chain_trained_with_augmentation_serves_what_the_trainer_measured(base, tap: str) -> None:  # type: ignore[no-untyped-def]
    x = _images(16)
    y = np.array([1 - i % 2 for i in range(16)])
    blk = af.find_block(base, tap, af.WHOLE)
    assert blk is not None
    acts = af.block_inputs(base, blk, x)
    w0 = head.read(base, tap)
    same = af.write_block(base, blk, af.BlockFit(convs=tuple(af.conv_weights(base, blk)), head=w0))
    assert _served(same, x) == pytest.approx(_served(base, x), abs=1e-5)  # the stride-4 stem runs as in the graph

    def fit(seed: int, augment: bool) -> af.BlockFit:
        return af.finetune_block(acts, y, acts, _served(base, x), af.conv_weights(base, blk), w0, val_acts=acts,
                                 val_y=y, epochs=2, learning_rate=1e-3, l2=0.0, distill=0.0, ops=blk.ops,
                                 strides=blk.strides, augment=augment, seed=seed, batch_size=8)

    first, again, plain = fit(0, True), fit(0, True), fit(0, False)
    assert first.epoch > 0 and first.settings["augment"] is True
    for (w, b), (w2, b2) in zip(first.convs, again.convs):  # one seed, one model, augmentation included
        assert np.array_equal(w, w2) and np.array_equal(b, b2)
    assert any(not np.array_equal(w, w2) for (w, _), (w2, _) in zip(first.convs, plain.convs))  # it did transform
    from cxr.train import metrics

    served = _served(af.write_block(base, blk, first), x)
    assert metrics.roc_auc(y, served) == pytest.approx(first.history[first.epoch]["calibrate_auc"], abs=1e-6)


def test_the_augmentation_is_a_small_transform_about_the_centre() -> None:
    rng = np.random.default_rng(0)
    assert af.affine(rng, 3, (224, 224), degrees=0, shift=0, zoom=0) == pytest.approx(
        np.tile([1, 0, 0, 0, 1, 0, 0, 0], (3, 1)))
    t = af.affine(np.random.default_rng(1), 500, (100, 200), degrees=10, shift=0.05, zoom=0.1)
    cx, cy = (200 - 1) / 2, (100 - 1) / 2
    x_in, y_in = t[:, 0] * cx + t[:, 1] * cy + t[:, 2], t[:, 3] * cx + t[:, 4] * cy + t[:, 5]
    assert np.abs(x_in - cx).max() <= 0.05 * 200 + 1e-3 and np.abs(y_in - cy).max() <= 0.05 * 100 + 1e-3
    scale = np.hypot(t[:, 0], t[:, 3])  # 1 / zoom
    assert scale.min() >= 1 / 1.1 - 1e-6 and scale.max() <= 1 / 0.9 + 1e-6
    assert np.degrees(np.abs(np.arctan2(t[:, 3], t[:, 0]))).max() <= 10 + 1e-6
    assert np.abs(np.diff(x_in)).max() > 1  # not one transform repeated


def test_the_kit_block_replay_is_validated() -> None:
    kit = adapt_kit.load(MODEL)
    assert kit.replay_block_input == "" or len(kit.replay_block) == len(kit.replay_block_index)
    fields = {k: getattr(kit, k) for k in kit.__dataclass_fields__}
    ok = adapt_kit.AdaptKit(**{**fields, "replay_block_input": "t:0", "replay_block": np.zeros((3, 2, 7, 7), np.float16),
                               "replay_block_index": np.array([0, 1, 2])})
    assert ok.replay_block.shape == (3, 2, 7, 7)
    with pytest.raises(ValueError, match="block replay"):
        adapt_kit.AdaptKit(**{**fields, "replay_block_input": "", "replay_block": np.zeros((3, 2, 7, 7), np.float16),
                              "replay_block_index": np.array([0, 1, 2])})
    with pytest.raises(ValueError, match="block replay"):
        adapt_kit.AdaptKit(**{**fields, "replay_block_input": "t:0", "replay_block": np.zeros((3, 2, 7, 7), np.float16),
                              "replay_block_index": np.array([0, 1, len(kit.replay_gap)])})


def test_the_efficientnets_linear_projection_and_relu6_head_conv_adapt_as_served() -> None:
    """EfficientNet-Lite0 ends ... depthwise conv, ReLU6, a linear 1x1 projection, a 1x1 head convolution, ReLU6,
    the pool: its last 2 convolutions are a block (no activation between them), a third would be the depthwise
    convolution, which the trainer does not run."""
    folder = SHIPPED_REPOSITORY / "pneumonia_accurate"
    base = ood_head.strip(onnx.load(str(folder / "1" / "model.onnx")))
    tap = adapt_kit.load(folder).taps[0]
    blk = af.find_block(base, tap, 2)
    assert blk is not None and blk.ops == ("Conv", "Conv", "Clip")
    assert af.find_block(base, tap, 3) is None and af.find_block(base, tap, af.WHOLE) == blk
    x = _images(16)
    y = np.array([1 - i % 2 for i in range(16)])
    w0 = head.read(base, tap)
    same = af.write_block(base, blk, af.BlockFit(convs=tuple(af.conv_weights(base, blk)), head=w0))
    assert _served(same, x) == pytest.approx(_served(base, x), abs=1e-5)  # ReLU6 and the linear conv as in the graph
    acts = af.block_inputs(base, blk, x)
    fit = af.finetune_block(acts, y, acts, _served(base, x), af.conv_weights(base, blk), w0, val_acts=acts, val_y=y,
                            epochs=2, learning_rate=3e-3, l2=0.0, distill=0.0, ops=blk.ops)
    from cxr.train import metrics

    served = _served(af.write_block(base, blk, fit), x)
    assert metrics.roc_auc(y, served) == pytest.approx(fit.history[fit.epoch]["calibrate_auc"], abs=1e-6)


def test_two_activations_in_a_row_or_none_first_is_not_a_block() -> None:
    assert af._conv_then_activation(["Conv", "Clip", "Conv", "Conv", "Relu"])
    assert not af._conv_then_activation(["Conv", "Relu", "Clip"])
    assert not af._conv_then_activation(["Relu", "Conv"])
    assert not af._conv_then_activation([])
