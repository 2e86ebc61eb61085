"""The Python-backend model's logic (OnnxBatchRunner) without Triton."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.serving.integrity import sha256_file
from cxr.serving.python_model import OnnxBatchRunner
from tests.conftest import SHIPPED_REPOSITORY

ONNX = SHIPPED_REPOSITORY / "pneumonia" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def runner() -> OnnxBatchRunner:
    return OnnxBatchRunner(ONNX, max_batch_size=8, expected_sha256=sha256_file(ONNX))


def test_requests_are_concatenated_and_split_back(runner: OnnxBatchRunner) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 224, 224, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 224, 224, 1), dtype=np.uint8)
    out = runner.run([a, b])
    alone = runner.run([np.concatenate([a, b])])[0]
    assert out[0].shape == (2, 1) and out[1].shape == (3, 1)  # type: ignore[union-attr]
    np.testing.assert_allclose(np.concatenate([out[0], out[1]]), alone, atol=1e-6)  # type: ignore[list-item]


def test_bad_request_fails_alone(runner: OnnxBatchRunner) -> None:
    good = np.zeros((1, 224, 224, 1), np.uint8)
    out = runner.run([np.zeros((1, 224, 224, 1), np.float32), good, None, np.zeros((9, 224, 224, 1), np.uint8)])
    assert isinstance(out[0], str) and "dtype" in out[0]
    assert isinstance(out[1], np.ndarray) and out[1].shape == (1, 1)
    assert isinstance(out[2], str) and "missing input" in out[2]
    assert isinstance(out[3], str) and "max_batch_size" in out[3]


def test_sha256_mismatch_refuses_to_load() -> None:
    with pytest.raises(RuntimeError, match="refusing to load"):
        OnnxBatchRunner(ONNX, max_batch_size=8, expected_sha256="0" * 64)
