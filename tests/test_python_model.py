"""The Python-backend model's logic (OnnxBatchRunner) without Triton."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.core import contract
from cxr.core.integrity import sha256_file
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
    assert isinstance(out[0], dict) and isinstance(out[1], dict) and isinstance(alone, dict)
    assert set(out[0]) == set(contract.OUTPUT_NAMES)  # both outputs, for every request
    for name in contract.OUTPUT_NAMES:
        assert out[0][name].shape == (2, 1) and out[1][name].shape == (3, 1)
        assert out[0][name].dtype == np.float32
        np.testing.assert_allclose(np.concatenate([out[0][name], out[1][name]]), alone[name], rtol=1e-5, atol=1e-6)


def test_bad_request_fails_alone(runner: OnnxBatchRunner) -> None:
    good = np.zeros((1, 224, 224, 1), np.uint8)
    out = runner.run([np.zeros((1, 224, 224, 1), np.float32), good, None, np.zeros((9, 224, 224, 1), np.uint8)])
    assert isinstance(out[0], str) and "dtype" in out[0]
    assert isinstance(out[1], dict) and out[1][contract.OUTPUT_NAME].shape == (1, 1)
    assert isinstance(out[2], str) and "missing input" in out[2]
    assert isinstance(out[3], str) and "max_batch_size" in out[3]


def test_sha256_mismatch_refuses_to_load() -> None:
    with pytest.raises(RuntimeError, match="refusing to load"):
        OnnxBatchRunner(ONNX, max_batch_size=8, expected_sha256="0" * 64)
