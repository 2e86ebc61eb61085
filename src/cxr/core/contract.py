"""The model contract: one home for everything the stack's parts must agree on.

Training, export, the Triton model, the client, the UI and the load tests all
import this module. It holds the input geometry, tensor names and dtypes,
labels, served parameter names, result statuses, the not-assessable rules and
their limits, and the decision rules (:func:`is_positive`,
:func:`is_out_of_distribution`). Turning an image into the model's input is
:mod:`cxr.core.imaging`'s job, above this module.

Intensity scaling (``/255`` and per-image standardisation) happens inside the
model graph, so ONNX and Triton inherit it and clients send raw ``uint8`` pixels.

This module depends on numpy only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from cxr.core.errors import InvalidInputError, NotAssessableError

#: Side of the square model input, in pixels (the report's 224x224).
IMAGE_SIZE = 224
#: Channels of the model input: chest X-rays are grayscale. The InceptionV3
#: variant replicates the channel to RGB inside its graph.
CHANNELS = 1
#: Shape of one preprocessed image (height, width, channels).
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)

#: Input tensor: raw pixels, batch-first, NHWC.
INPUT_NAME = "image"
INPUT_DTYPE = np.dtype(np.uint8)
INPUT_TRITON_DTYPE = "UINT8"
#: Output tensor: calibrated probability of pneumonia, shape (batch, 1).
OUTPUT_NAME = "probability"
OUTPUT_DTYPE = np.dtype(np.float32)
OUTPUT_TRITON_DTYPE = "FP32"
OUTPUT_SHAPE = (1,)
#: Second output: out-of-distribution score, shape (batch, 1). Higher = less like the training X-rays
#: (Mahalanobis distance of the network's pooled features; see cxr.export.ood_head).
OOD_OUTPUT_NAME = "ood_score"
OOD_OUTPUT_DTYPE = np.dtype(np.float32)
OOD_OUTPUT_TRITON_DTYPE = "FP32"
#: Every output of the served model, in order.
OUTPUT_NAMES = (OUTPUT_NAME, OOD_OUTPUT_NAME)
#: Name of the symbolic batch dimension in the exported ONNX.
BATCH_DIM = "batch"

#: Human-readable labels, index = class (0 negative, 1 positive).
LABELS = ("Normal", "Pneumonia")
#: Folder names of the Kaggle layout, index = class.
CLASS_DIRS = ("NORMAL", "PNEUMONIA")
#: Default decision threshold before a site calibration has been stored.
DEFAULT_THRESHOLD = 0.5

#: Triton config parameter keys through which threshold and labels travel.
PARAM_THRESHOLD = "threshold"
PARAM_LABELS = "labels"
PARAM_SHA256 = "sha256"
PARAM_OOD_THRESHOLD = "ood_threshold"
#: The DICOM eligibility rules (JSON text of the model folder's ``eligibility.json``).
PARAM_ELIGIBILITY = "eligibility"
#: Named operating points (JSON ``{"pediatric": 0.12, "adult": 0.34}``) and the one a client gets when it names
#: none. ``threshold`` is always the default point's threshold, so a generic Triton client still reads one.
PARAM_OPERATING_POINTS = "operating_points"
PARAM_DEFAULT_OPERATING_POINT = "default_operating_point"
#: The operating point of a model that publishes none (its one ``threshold``).
SINGLE_OPERATING_POINT = "default"
#: Patients younger than this (in years) are answered at the ``pediatric`` point, the rest at ``adult``, when a
#: DICOM header gives the age and no operating point is named.
ADULT_AGE_YEARS = 18


def population_for_age(age_years: float) -> str:
    """``pediatric`` below :data:`ADULT_AGE_YEARS`, else ``adult`` (the operating points' names)."""
    if not (age_years >= 0):
        raise ValueError(f"age must be >= 0 years, got {age_years}")
    return "pediatric" if age_years < ADULT_AGE_YEARS else "adult"


#: Study priorities and the Triton priority level each is sent at (1 is served first). Every config has
#: ``priority_levels`` = :data:`PRIORITY_LEVELS` and ``default_priority_level`` = the routine level, so a client
#: that sends no priority is routine.
PRIORITIES = {"urgent": 1, "routine": 2}
PRIORITY_LEVELS = 2
DEFAULT_PRIORITY = "routine"


def priority_level(priority: str) -> int:
    """The Triton priority level of ``urgent`` or ``routine``."""
    try:
        return PRIORITIES[priority]
    except KeyError:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}") from None


class Status(str, enum.Enum):
    """The outcome of one input, on every surface (client, CSV, UI, load tests).

    * ``ok``: the model judged the image; the label is Normal or Pneumonia.
    * ``not_assessable``: the input is readable but outside what the model can
      judge (not a frontal chest radiograph, blank, colour, out of
      distribution ...). There is no label; ``reason`` names the rule. A
      screening pipeline routes these to a human reader.
    * ``error``: the input could not be read, or the server failed.
    """

    OK = "ok"
    NOT_ASSESSABLE = "not_assessable"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


#: Rules that make an input not assessable, by the name that appears in ``reason``.
RULES = {
    "dicom_modality": "DICOM Modality is not a radiograph (CR, DX)",
    "dicom_body_part": "DICOM BodyPartExamined is not CHEST",
    "dicom_view_position": "DICOM ViewPosition is not frontal (PA, AP)",
    "dicom_photometric": "DICOM PhotometricInterpretation is not MONOCHROME1/2",
    "dicom_frames": "DICOM has more than one frame",
    "blank_image": "blank or near-constant image",
    "colour_image": "strongly coloured image (radiographs are grey)",
    "aspect_ratio": "extreme aspect ratio",
    "out_of_distribution": "image unlike the chest X-rays the model was trained on (ood_score above its threshold)",
}

#: Pixel rules, measured on 5,507 real chest X-rays (Kaggle train+val at 224 px, the site sample, and the
#: 64 full-resolution originals; docs/model/ood.md): grey-level standard deviation min 19.9 (0.1% quantile
#: 25.6), 1st-99th percentile spread min 85, mean chroma 0.0 everywhere, aspect ratio max 1.88.
#: An image is blank when its standard deviation or its percentile spread is below these:
BLANK_STD_MIN = 8.0
BLANK_SPREAD_MIN = 32.0
#: Mean chroma (max - min over R, G, B, in 0..255 grey levels) above which an image is colour.
COLOUR_CHROMA_MAX = 12.0
#: Longest side over shortest side above which an image is refused.
ASPECT_RATIO_MAX = 2.5

#: Largest accepted image, in pixels (decompression-bomb guard). The largest
#: Kaggle original is 2890x2534 (7.3 MP); DR detectors reach about 4300x4300.
MAX_PIXELS = 40_000_000
#: Smallest accepted side, in pixels; thinner images carry no chest.
MIN_SIDE = 32
#: Largest accepted encoded file, in bytes.
MAX_FILE_BYTES = 64 * 1024 * 1024

#: Image file suffixes that directory walks pick up.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom")

def is_positive(probability: float | np.ndarray, threshold: float) -> bool | np.ndarray:
    """The decision rule, the one place it lives: positive (Pneumonia) when ``probability >= threshold``.

    Works on a number or elementwise on an array.
    """
    if isinstance(probability, np.ndarray):
        return probability >= threshold
    return bool(probability >= threshold)


def label_for(probability: float, threshold: float, labels: tuple[str, ...] = LABELS) -> str:
    """Return the label for a probability: ``labels[1]`` (Pneumonia) when :func:`is_positive`."""
    return labels[1] if is_positive(probability, threshold) else labels[0]


def is_out_of_distribution(ood_score: float, ood_threshold: float | None) -> bool:
    """The OOD rule: refused when the score exceeds the served threshold (``None``: the model has no OOD output)."""
    return ood_threshold is not None and not (ood_score <= ood_threshold)  # NaN counts as out of distribution


@dataclass(frozen=True)
class Refusal:
    """Why an input is not assessable, as data: presenters (CSV, page, SR, FHIR) show it, nothing parses it.

    Attributes:
        rule: The rule that refused it (a key of :data:`RULES`).
        value: What the rule measured: a number (``ood_score``, grey-level std, chroma, aspect ratio) or a DICOM
            header's text; ``None`` when the rule measures nothing (a missing header).
        limit: The limit it broke: a number, or the allowed values' text.
        detail: The rule's one-line explanation for people (without the input's name).
    """

    rule: str
    value: float | str | None = None
    limit: float | str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}")
        for name in ("value", "limit"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (int, float, str)):
                raise ValueError(f"refusal {name} must be a number or text, got {type(v).__name__}")

    @property
    def description(self) -> str:
        """What the rule means (:data:`RULES`)."""
        return RULES[self.rule]

    @classmethod
    def of(cls, exc: NotAssessableError) -> Refusal:
        """The refusal an error carries."""
        return cls(exc.rule, exc.value, exc.limit, exc.detail)


def not_assessable(name: str, rule: str, detail: str, *, value: float | str | None = None,
                   limit: float | str | None = None) -> NotAssessableError:
    """A :class:`NotAssessableError` for ``rule`` (one of :data:`RULES`): a one-line message, and the refusal's
    fields (what was measured, the limit) as data."""
    Refusal(rule, value, limit, detail)  # validated here, where it is raised
    return NotAssessableError(f"{name}: not assessable ({rule}): {detail}", rule=rule, value=value, limit=limit,
                              detail=detail)


def format_probability(p: float) -> str:
    """``P(pneumonia)`` for people: three decimals, and ``> 0.999`` / ``< 0.001`` at the ends (never ``1.000``)."""
    if p > 0.999:
        return "> 0.999"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.3f}"


def validate_batch(batch: np.ndarray, *, max_batch_size: int | None = None, name: str = "batch") -> np.ndarray:
    """Check a batch against the input contract and return it unchanged.

    Input contract: ``uint8`` array of shape ``(N, 224, 224, 1)`` with
    ``1 <= N`` (and ``N <= max_batch_size`` when given).

    Raises:
        InvalidInputError: Wrong dtype, shape or batch size.
    """
    if not isinstance(batch, np.ndarray):
        raise InvalidInputError(f"{name}: expected numpy.ndarray, got {type(batch).__name__}")
    if batch.dtype != INPUT_DTYPE:
        raise InvalidInputError(f"{name}: dtype must be {INPUT_DTYPE}, got {batch.dtype}")
    if batch.ndim != 4 or batch.shape[1:] != IMAGE_SHAPE or batch.shape[0] < 1:
        raise InvalidInputError(f"{name}: shape must be (N, {', '.join(map(str, IMAGE_SHAPE))}), got {batch.shape}")
    if max_batch_size is not None and batch.shape[0] > max_batch_size:
        raise InvalidInputError(f"{name}: batch of {batch.shape[0]} exceeds max_batch_size {max_batch_size}")
    return batch
