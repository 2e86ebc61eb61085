"""The model contract: one home for everything the stack's parts must agree on.

Training, export parity, the Triton model, the client, the UI and the load
tests all import this module. It holds the input geometry, tensor names and
dtypes, labels, and :func:`preprocess`, the one function that turns an image
(any size, bit depth or colour mode) into the model's input.

Geometry (decode, grayscale, resize) happens here; intensity scaling
(``/255`` and per-image standardisation) happens inside the model graph, so
ONNX and Triton inherit it and clients send raw ``uint8`` pixels.

This module depends on numpy and Pillow only (no TensorFlow), so a client-only
install can use it.
"""

from __future__ import annotations

import enum
import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr.errors import InvalidInputError, NotAssessableError

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

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]


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


def not_assessable(name: str, rule: str, detail: str) -> NotAssessableError:
    """A :class:`NotAssessableError` for ``rule`` (one of :data:`RULES`), with a one-line message."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    return NotAssessableError(f"{name}: not assessable ({rule}): {detail}", rule=rule)


def format_probability(p: float) -> str:
    """``P(pneumonia)`` for people: three decimals, and ``> 0.999`` / ``< 0.001`` at the ends (never ``1.000``)."""
    if p > 0.999:
        return "> 0.999"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.3f}"


def describe(source: ImageSource) -> str:
    """Short name of an input for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {source.shape}>"
    return f"<{type(source).__name__}>"


def _is_dicom(head: bytes) -> bool:
    """DICOM Part 10 (``DICM`` after the 128-byte preamble), or a bare data set without the preamble.

    A bare data set starts with a group 0x0002 (file meta) or 0x0008 element in
    little-endian order, followed by a two-letter VR or a 4-byte length.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if head[:4] == b"DICM":
        return True
    if len(head) >= 8 and head[1] == 0x00 and head[0] in (0x02, 0x08) and head[3] == 0x00:
        vr = head[4:6]
        return vr.isalpha() and vr.isupper() or int.from_bytes(head[4:8], "little") < 0x10000
    return False


def _read_bytes(source: str | os.PathLike | bytes | bytearray, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(os.fspath(source))
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InvalidInputError(f"{name}: cannot read file ({exc.strerror or exc})") from None
        if size > MAX_FILE_BYTES:
            raise InvalidInputError(f"{name}: file too large ({size} bytes > {MAX_FILE_BYTES})")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"{name}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise InvalidInputError(f"{name}: empty file")
    return data


def _array_to_gray_u8(array: np.ndarray, name: str) -> np.ndarray:
    """Bring a decoded pixel array to 2-D uint8 grayscale.

    8-bit data is kept as is; deeper integer data and float data are min-max
    windowed to 0..255 (a 12-bit image in a 16-bit container would otherwise be
    almost black).
    """
    if array.ndim == 3:
        if array.shape[2] == 1:
            array = array[:, :, 0]
        elif array.shape[2] in (3, 4):
            luma = array[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL "L"
            array = np.rint(luma).astype(np.uint8) if array.dtype == np.uint8 else luma
        else:
            raise InvalidInputError(f"{name}: unsupported channel count {array.shape[2]}")
    elif array.ndim != 2:
        raise InvalidInputError(f"{name}: expected a 2-D or 3-D pixel array, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidInputError(f"{name}: unsupported pixel dtype {array.dtype}")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInputError(f"{name}: pixel data contains NaN or Inf")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:  # constant: kept constant (the blank rule refuses it), never stretched
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def assess_pixels(gray: np.ndarray, name: str, *, chroma: float = 0.0) -> None:
    """The pixel rules on a decoded 2-D uint8 grayscale image (before resizing).

    Raises:
        NotAssessableError: ``aspect_ratio``, ``colour_image`` or ``blank_image``.
    """
    h, w = gray.shape[:2]
    aspect = max(h, w) / max(1, min(h, w))
    if aspect > ASPECT_RATIO_MAX:
        raise not_assessable(name, "aspect_ratio", f"{w}x{h} px, ratio {aspect:.2f} > {ASPECT_RATIO_MAX}")
    if chroma > COLOUR_CHROMA_MAX:
        raise not_assessable(name, "colour_image", f"mean chroma {chroma:.1f} > {COLOUR_CHROMA_MAX}")
    step = max(1, int(np.sqrt(gray.size / 250_000)))  # statistics on at most ~250k pixels
    sample = gray[::step, ::step].astype(np.float32)
    std = float(sample.std())
    lo, hi = np.percentile(sample, [1, 99])
    if std < BLANK_STD_MIN or hi - lo < BLANK_SPREAD_MIN:
        raise not_assessable(name, "blank_image", f"grey-level std {std:.1f} (min {BLANK_STD_MIN}), "
                             f"1-99% spread {hi - lo:.0f} (min {BLANK_SPREAD_MIN:.0f})")


def chroma_of(rgb: np.ndarray) -> float:
    """Mean of max - min over the colour channels of an ``(H, W, 3+)`` array (0 for grey images)."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    sample = rgb[::step, ::step, :3].astype(np.float32)
    if np.issubdtype(rgb.dtype, np.integer) and rgb.dtype.itemsize > 1:
        sample *= 255.0 / float(np.iinfo(rgb.dtype).max)
    return float((sample.max(axis=-1) - sample.min(axis=-1)).mean())


def _check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise InvalidInputError(
            f"{name}: image too large ({width}x{height} = {width * height} pixels > {MAX_PIXELS}); "
            "refusing to decode (decompression-bomb guard)"
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidInputError(f"{name}: image too small ({width}x{height}); need at least {MIN_SIDE} px per side")


def _resize(gray: np.ndarray) -> np.ndarray:
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        gray = np.asarray(Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    return gray.reshape(IMAGE_SHAPE)


def _decode_pil(image: Image.Image, name: str, *, draft: bool) -> tuple[np.ndarray, float]:
    _check_size(image.width, image.height, name)
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1:
        raise InvalidInputError(f"{name}: multi-frame image ({frames} frames); send one frame per image")
    if draft and image.format == "JPEG" and image.mode in ("L", "RGB", "CMYK", "YCbCr"):
        # DCT-domain downscaling: decodes at 1/2..1/8 size, never below 2x the target.
        image.draft(image.mode if image.mode == "L" else "RGB", (2 * IMAGE_SIZE, 2 * IMAGE_SIZE))
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInputError(f"{name}: corrupt or truncated image ({exc})") from None
    mode = image.mode
    chroma = 0.0
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or mode == "L":
        array = np.asarray(image)
    elif mode in ("1", "LA"):
        array = np.asarray(image.convert("L"))
    else:  # RGB, RGBA, P, PA, CMYK, YCbCr, LAB, HSV ...: alpha dropped, luma kept
        rgb = image.convert("RGB")
        chroma = chroma_of(np.asarray(rgb))
        array = np.asarray(rgb.convert("L"))
    return _array_to_gray_u8(array, name), chroma


def preprocess_with_meta(
    source: ImageSource, *, name: str | None = None, draft: bool = True, rules: bool = True,
    eligibility: object | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Turn one image into the model's input; also return metadata (``sop_instance_uid`` for DICOM).

    Input contract:
        ``source`` is a path, encoded bytes (JPEG, PNG, BMP, TIFF, GIF, WebP or
        DICOM), a ``PIL.Image``, or a pixel array. Arrays are ``(H, W)``,
        ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``; ``uint8`` is used as is,
        other integer dtypes and finite floats are min-max windowed to 0..255.
        Sides must be at least :data:`MIN_SIDE` and the area at most
        :data:`MAX_PIXELS`. Multi-frame images are refused.

    Eligibility (``rules=True``): DICOM headers are checked first against the
    eligibility rules (:mod:`cxr.eligibility`), then the pixel rules of
    :func:`assess_pixels` (aspect ratio, colour, blank). A readable input that
    breaks a rule raises :class:`NotAssessableError` naming the rule. The
    learned out-of-distribution rule needs the model and is applied by the
    client on the served ``ood_score``.

    Output contract:
        ``numpy.ndarray`` of dtype ``uint8``, shape :data:`IMAGE_SHAPE`
        ``(224, 224, 1)``, values 0..255 (grayscale, aspect ratio not kept, as
        the training data).

    Args:
        source: The image.
        name: Name used in error messages (defaults to the path or a summary).
        draft: Let JPEG decoding downscale in the DCT domain (much faster on
            multi-megapixel X-rays; differences are a few grey levels).
        rules: Apply the eligibility and pixel rules (training data loaders turn them off).
        eligibility: DICOM rules (:class:`cxr.eligibility.Eligibility`); default: the shipped file.

    Raises:
        InvalidInputError: The input cannot be read or violates the contract.
        NotAssessableError: The input is readable but breaks an eligibility rule.
    """
    name = name or describe(source)
    gray, meta, chroma = decode_gray(source, name=name, draft=draft, eligibility=eligibility if rules else False)
    if rules:
        assess_pixels(gray, name, chroma=chroma)
    return _resize(gray), meta


def decode_gray(
    source: ImageSource, *, name: str | None = None, draft: bool = False, eligibility: object | None = False,
) -> tuple[np.ndarray, dict[str, str], float]:
    """Decode any accepted input to 2-D uint8 grayscale at its own size (no pixel rules, no resize).

    Returns the image, its metadata (``sop_instance_uid`` for DICOM) and its
    mean chroma (0 for grey inputs). ``eligibility``: DICOM header rules
    (``False``: none, ``None``: the shipped rules).

    Raises:
        InvalidInputError: The input cannot be read or violates the contract.
        NotAssessableError: A DICOM header breaks an eligibility rule.
    """
    name = name or describe(source)
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3):
            raise InvalidInputError(f"{name}: expected a 2-D or 3-D pixel array, got shape {source.shape}")
        _check_size(source.shape[1], source.shape[0], name)
        chroma = chroma_of(source) if source.ndim == 3 and source.shape[2] >= 3 else 0.0
        return _array_to_gray_u8(source, name), {}, chroma
    if isinstance(source, Image.Image):
        gray, chroma = _decode_pil(source, name, draft=draft)
        return gray, {}, chroma
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise InvalidInputError(f"{name}: unsupported input type {type(source).__name__}")
    data = _read_bytes(source, name)
    if _is_dicom(data[:132]):
        from cxr.dicom import read_dicom

        gray, uid, chroma = read_dicom(data, name=name, eligibility=eligibility)
        return gray, ({"sop_instance_uid": uid} if uid else {}), chroma
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidInputError(f"{name}: not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInputError(f"{name}: corrupt image header ({exc})") from None
    except Image.DecompressionBombError as exc:  # PIL's own guard for absurd headers
        raise InvalidInputError(f"{name}: image too large, refusing to decode ({exc})") from None
    with image:
        gray, chroma = _decode_pil(image, name, draft=draft)
    return gray, {}, chroma


def preprocess(
    source: ImageSource, *, name: str | None = None, draft: bool = True, rules: bool = True,
    eligibility: object | None = None,
) -> np.ndarray:
    """Turn one image into the model's input (see :func:`preprocess_with_meta` for the contract)."""
    return preprocess_with_meta(source, name=name, draft=draft, rules=rules, eligibility=eligibility)[0]


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
