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
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise InvalidInputError(f"{name}: unsupported DICOM pixel shape {pixels.shape}")
    from cxr.contract import MAX_PIXELS, MIN_SIDE, _array_to_gray_u8

    h, w = pixels.shape[:2]
    if h * w > MAX_PIXELS or min(h, w) < MIN_SIDE:
        raise InvalidInputError(f"{name}: DICOM image size {w}x{h} outside the accepted range")
    values = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        values = apply_voi_lut(values, ds, index=0)
    # The contract's conversion: luma for colour, NaN/Inf refused, min-max window to 0..255.
    gray = _array_to_gray_u8(np.asarray(values, dtype=np.float64), name)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: high values are dark
    return gray, uid
