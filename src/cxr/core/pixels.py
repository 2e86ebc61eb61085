"""Pixel arrays: grayscale conversion, size checks, the pixel rules and the resize to the model's input.

Below the decoders (:mod:`cxr.core.dicom`, :mod:`cxr.core.imaging`), above :mod:`cxr.core.contract`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr.core.contract import (
    ASPECT_RATIO_MAX,
    BLANK_SPREAD_MIN,
    BLANK_STD_MIN,
    COLOUR_CHROMA_MAX,
    IMAGE_SHAPE,
    IMAGE_SIZE,
    MAX_PIXELS,
    MIN_SIDE,
    not_assessable,
)
from cxr.core.errors import InvalidInputError


def to_gray_u8(array: np.ndarray, name: str) -> np.ndarray:
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
        raise not_assessable(name, "aspect_ratio", f"{w}x{h} px, ratio {aspect:.2f} > {ASPECT_RATIO_MAX}",
                             value=float(aspect), limit=ASPECT_RATIO_MAX)
    if chroma > COLOUR_CHROMA_MAX:
        raise not_assessable(name, "colour_image", f"mean chroma {chroma:.1f} > {COLOUR_CHROMA_MAX}",
                             value=float(chroma), limit=COLOUR_CHROMA_MAX)
    step = max(1, int(np.sqrt(gray.size / 250_000)))  # statistics on at most ~250k pixels
    sample = gray[::step, ::step].astype(np.float32)
    std = float(sample.std())
    lo, hi = np.percentile(sample, [1, 99])
    if std < BLANK_STD_MIN or hi - lo < BLANK_SPREAD_MIN:
        # the measure reported is the one that failed (the std first)
        value, limit = (std, BLANK_STD_MIN) if std < BLANK_STD_MIN else (float(hi - lo), BLANK_SPREAD_MIN)
        raise not_assessable(name, "blank_image", f"grey-level std {std:.1f} (min {BLANK_STD_MIN}), "
                             f"1-99% spread {hi - lo:.0f} (min {BLANK_SPREAD_MIN:.0f})", value=value, limit=limit)


def chroma_of(rgb: np.ndarray) -> float:
    """Mean of max - min over the colour channels of an ``(H, W, 3+)`` array (0 for grey images)."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    sample = rgb[::step, ::step, :3].astype(np.float32)
    if np.issubdtype(rgb.dtype, np.integer) and rgb.dtype.itemsize > 1:
        sample *= 255.0 / float(np.iinfo(rgb.dtype).max)
    return float((sample.max(axis=-1) - sample.min(axis=-1)).mean())


def check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise InvalidInputError(
            f"{name}: image too large ({width}x{height} = {width * height} pixels > {MAX_PIXELS}); "
            "refusing to decode (decompression-bomb guard)"
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidInputError(f"{name}: image too small ({width}x{height}); need at least {MIN_SIDE} px per side")


def resize(gray: np.ndarray) -> np.ndarray:
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        gray = np.asarray(Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    return gray.reshape(IMAGE_SHAPE)
