"""Grad-CAM for the served model, without TensorFlow.

The export writes ``<model>/explain/features.onnx`` (the last convolutional
feature maps ``A``, shape ``(N, 7, 7, C)``) and ``head.npz`` (the head's
dense weights). For the head GAP -> Dense(relu) -> Dense(1), Grad-CAM's channel
weights are exact: with ``g = mean_ij A``, ``h = g W1 + b1``, logit
``z = relu(h) w2 + b2``, ``alpha = dz/dg = W1 (w2 * [h > 0])``; the map is
``relu(sum_k alpha_k A_k)``, upsampled to the image. The calibration
(``sigmoid(scale * z + bias)`` with ``scale > 0``) is monotonic in ``z``, so
the map explains the served probability too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cxr import contract
from cxr.errors import CxrError


class GradCam:
    """Grad-CAM heatmaps from a model folder's ``explain/`` companion files."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        d = Path(model_dir) / "explain"
        if not (d / "features.onnx").exists() or not (d / "head.npz").exists():
            raise CxrError(f"{d}: no Grad-CAM files (features.onnx, head.npz); re-run `cxr export`")
        self._session = ort.InferenceSession(str(d / "features.onnx"), providers=["CPUExecutionProvider"])
        head = np.load(d / "head.npz")
        self.w1, self.b1 = head["w1"].astype(np.float64), head["b1"].astype(np.float64)
        self.w2 = head["w2"].astype(np.float64)[:, 0]  # the bias b2 shifts the logit, not its gradient

    def features(self, image: np.ndarray) -> np.ndarray:
        """Last convolutional maps ``(h, w, C)`` for one contract image ``(224, 224, 1) uint8``."""
        batch = contract.validate_batch(image[None], name="image")
        return self._session.run(["features"], {contract.INPUT_NAME: batch})[0][0].astype(np.float64)

    def heatmap(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM map in [0, 1], shape ``(224, 224)`` float32, for one contract image."""
        a = self.features(image)
        h = a.mean(axis=(0, 1)) @ self.w1 + self.b1
        alpha = self.w1 @ (self.w2 * (h > 0))
        cam = np.maximum((a * alpha).sum(axis=-1), 0)
        if cam.max() > 0:
            cam = cam / cam.max()
        up = Image.fromarray((cam * 255).astype(np.uint8)).resize(
            (contract.IMAGE_SIZE, contract.IMAGE_SIZE), Image.Resampling.BICUBIC
        )
        return np.asarray(up, dtype=np.float32) / 255.0


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Blend a ``(224, 224)`` heatmap over a contract image as RGB ``uint8`` (blue low, red high)."""
    gray = image.reshape(contract.IMAGE_SIZE, contract.IMAGE_SIZE).astype(np.float32)
    base = np.stack([gray] * 3, axis=-1)
    t = np.clip(heat, 0, 1)[..., None]
    colour = np.concatenate([np.clip(1.5 - np.abs(4 * t - 3), 0, 1), np.clip(1.5 - np.abs(4 * t - 2), 0, 1),
                             np.clip(1.5 - np.abs(4 * t - 1), 0, 1)], axis=-1) * 255  # jet-like
    weight = alpha * t  # cold regions stay mostly the X-ray
    return np.clip(base * (1 - weight) + colour * weight, 0, 255).astype(np.uint8)
