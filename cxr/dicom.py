"""DICOM (CR/DX) decoding to the contract's grayscale, without logging patient data.

Handles MONOCHROME1 inversion, rescale slope/intercept, VOI LUT or window
centre/width when present (else the full stored range), 8-16-bit data, and the
compressed transfer syntaxes that pydicom's installed handlers support
(pylibjpeg plugins add JPEG, JPEG-LS and JPEG 2000).
"""

from __future__ import annotations

import io

import numpy as np

from cxr.errors import InvalidInputError


def read_dicom(data: bytes, *, name: str) -> tuple[np.ndarray, str | None]:
    """Decode DICOM bytes to a 2-D uint8 image and its SOP Instance UID.

    Raises:
        InvalidInputError: Not readable, no pixel data, multi-frame, or an
            unsupported transfer syntax. Messages never include patient tags.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InvalidInputError(f"{name}: DICOM input needs pydicom (pip install 'cxr-triton[client]')") from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise InvalidInputError(f"{name}: unreadable DICOM ({type(exc).__name__})") from None
    uid = str(ds.get("SOPInstanceUID", "")) or None
    if "PixelData" not in ds:
        raise InvalidInputError(f"{name}: DICOM has no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InvalidInputError(f"{name}: multi-frame DICOM ({ds.NumberOfFrames} frames); send one frame per image")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InvalidInputError(f"{name}: cannot decode DICOM pixel data (transfer syntax {syntax}: {type(exc).__name__})") from None
    if pixels.ndim != 2:
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            pixels = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        else:
            raise InvalidInputError(f"{name}: unsupported DICOM pixel shape {pixels.shape}")
    from cxr.contract import MAX_PIXELS, MIN_SIDE

    h, w = pixels.shape
    if h * w > MAX_PIXELS or min(h, w) < MIN_SIDE:
        raise InvalidInputError(f"{name}: DICOM image size {w}x{h} outside the accepted range")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInputError(f"{name}: DICOM pixel data contains NaN or Inf")
    lo, hi = float(values.min()), float(values.max())
    scaled = np.zeros_like(values) if hi <= lo else (values - lo) * (255.0 / (hi - lo))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 255.0 - scaled  # MONOCHROME1: high values are dark
    return np.rint(scaled).astype(np.uint8), uid
