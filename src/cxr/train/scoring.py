"""Score contract batches with a Keras or ONNX model, with its stored calibration.

A run directory holds ``model.keras`` and, after ``cxr calibrate``,
``calibration.json``. Keras scores apply the calibration (``sigmoid(scale *
logit + bias)``); exported ONNX models have it baked into their graph.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
RULES = ("sensitivity", "sensitivity_lcb", "youden", "fixed")
SCALINGS = ("none", "temperature", "platt")


@dataclass(frozen=True)
class Calibration:
    """Decision threshold and probability scaling fitted on a labelled local sample.

    Attributes:
        threshold: Predict Pneumonia when the calibrated probability is >= this.
        scale: Multiplies the logit (``1 / temperature``).
        bias: Added to the scaled logit (Platt scaling; 0 for pure temperature).
        rule: How the threshold was chosen (``sensitivity``, ``sensitivity_lcb``, ``youden``, ``fixed``).
        target: Sensitivity target of the ``sensitivity`` rules.
        confidence: Confidence of the one-sided lower bound (``sensitivity_lcb``).
        scaling: ``none``, ``temperature`` or ``platt``.
        fitted_on: The folder the sample came from.
        n_images: Images in that sample.
        metrics: Metrics on that sample at ``threshold`` (in-sample, optimistic).
    """

    threshold: float = contract.DEFAULT_THRESHOLD
    scale: float = 1.0
    bias: float = 0.0
    rule: str = "fixed"
    target: float | None = None
    confidence: float | None = None
    scaling: str = "none"
    fitted_on: str | None = None
    n_images: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        if not math.isfinite(self.bias):
            raise ValueError(f"bias must be finite, got {self.bias}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from raw logits."""
        z = self.scale * np.asarray(logits, dtype=np.float64) + self.bias
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def save(self, path: Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Read a file written by :meth:`save`."""
        return cls(**json.loads(Path(path).read_text()))

    @classmethod
    def beside(cls, model_path: Path) -> Calibration:
        """The calibration stored next to a model, or the identity with threshold 0.5."""
        p = Path(model_path).parent / CALIBRATION_FILE
        return cls.load(p) if p.exists() else cls()


class Scorer(Protocol):
    """Maps a contract batch ``(N, 224, 224, 1) uint8`` to probabilities ``(N,)`` float32."""

    threshold: float

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class KerasScorer:
    """Calibrated probabilities from a ``.keras`` model (TensorFlow)."""

    def __init__(self, model_path: Path, calibration: Calibration | None = None, *, batch_size: int = 64) -> None:
        import keras

        from cxr.train import models  # noqa: F401  (registers custom layers)

        self.model = keras.models.load_model(str(model_path), compile=False)
        self.logit_model = models.logit_model(self.model)
        self.calibration = calibration if calibration is not None else Calibration.beside(model_path)
        self.threshold = self.calibration.threshold
        self.batch_size = batch_size

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits ``(N,)`` float32."""
        contract.validate_batch(batch)
        out = [
            np.asarray(self.logit_model([batch[i : i + self.batch_size].astype(np.float32)], training=False))
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(out).reshape(-1).astype(np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.calibration.apply(self.logits(batch))


class OnnxScorer:
    """Probabilities from an exported ONNX model (onnxruntime, CPU)."""

    def __init__(self, model_path: Path, *, threshold: float | None = None, batch_size: int = 64, threads: int = 0) -> None:
        from cxr.core.ort_session import make_session

        self.session = make_session(model_path, threads=threads)
        self.threshold = threshold if threshold is not None else contract.DEFAULT_THRESHOLD
        self.batch_size = batch_size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        contract.validate_batch(batch)
        out = [
            self.session.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: batch[i : i + self.batch_size]})[0]
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(out).reshape(-1).astype(np.float32)


def load_scorer(model_path: Path, *, threshold: float | None = None) -> Scorer:
    """A scorer for ``.keras`` (with its calibration) or ``.onnx`` (threshold from its model card when present)."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise CxrError(f"model not found: {model_path}")
    if model_path.suffix == ".keras":
        scorer: Scorer = KerasScorer(model_path)
    elif model_path.suffix == ".onnx":
        scorer = OnnxScorer(model_path, threshold=threshold if threshold is not None else _card_threshold(model_path))
    else:
        raise CxrError(f"{model_path}: expected a .keras or .onnx file")
    if threshold is not None:
        scorer.threshold = threshold
    return scorer


def _card_threshold(onnx_path: Path) -> float | None:
    """Threshold from the model card of a model-repository ONNX (``<model>/model_card.json``)."""
    from cxr.core.model_dir import ModelDir

    for d in (ModelDir(onnx_path.parent), ModelDir(onnx_path.parent.parent)):
        if d.has_card():
            return d.card().threshold
    return None
