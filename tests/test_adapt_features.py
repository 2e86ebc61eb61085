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
    assert af.find_block(base, tap, 50) is None  # the stem's strided convolution ends the chain
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
