"""DICOM (CR/DX) decoding to the contract's grayscale, without logging patient data.

Handles MONOCHROME1 inversion, rescale slope/intercept, VOI LUT or window
centre/width when present (else the full stored range), 8-16-bit data, and the
compressed transfer syntaxes that pydicom's installed handlers support
(pylibjpeg plugins add JPEG, JPEG-LS and JPEG 2000).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import numpy as np

from cxr.core.errors import InvalidInputError, NotAssessableError


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom logs tracebacks and warnings for damaged files; the caller reports one line instead."""
    log = logging.getLogger("pydicom")
    level, propagate = log.level, log.propagate
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
        log.propagate = propagate


_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def patient_age_years(ds) -> float | None:
    """The patient's age in years at the study: Patient's Age (``045Y``, ``006M``, ``003W``, ``010D``), else
    Patient's Birth Date and the Study (or Acquisition, Content) Date; ``None`` when the header cannot say."""
    import datetime as dt

    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in _AGE_UNITS:
        return int(text[:3]) * _AGE_UNITS[text[3]]

    def date(keyword: str) -> dt.date | None:
        v = str(ds.get(keyword, "") or "").strip()
        try:
            return dt.datetime.strptime(v[:8], "%Y%m%d").date() if len(v) >= 8 else None
        except ValueError:
            return None

    born = date("PatientBirthDate")
    seen = date("StudyDate") or date("AcquisitionDate") or date("ContentDate")
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


def read_dicom(data: bytes, *, name: str, eligibility: object | None = None,
               meta: dict | None = None) -> tuple[np.ndarray, str | None, float]:
    """Decode DICOM bytes to a 2-D uint8 image, its SOP Instance UID and its mean chroma.

    Files without the 128-byte preamble are read too. The header is checked
    against the eligibility rules (``eligibility``: an
    :class:`~cxr.core.eligibility.Eligibility`, ``None`` for the shipped rules,
    ``False`` for none) before any pixel is decoded.

    Raises:
        InvalidInputError: Not readable, no pixel data, or an unsupported
            transfer syntax. Messages never include patient tags.
        NotAssessableError: The header breaks an eligibility rule.

    ``meta``, when given, receives ``age_years`` (:func:`patient_age_years`) when the header states it.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InvalidInputError(f"{name}: DICOM input needs pydicom (pip install 'cxr-triton[client]')") from exc
    from cxr.core.contract import MAX_PIXELS, MIN_SIDE
    from cxr.core.eligibility import Eligibility
    from cxr.core.pixels import chroma_of, to_gray_u8

    with _quiet_pydicom():
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            public = [e.tag for e in ds if not e.tag.is_private]  # force=True defers parsing errors to access
        except Exception as exc:  # noqa: BLE001
            raise InvalidInputError(f"{name}: unreadable DICOM ({type(exc).__name__})") from None
        if not public:
            raise InvalidInputError(f"{name}: unreadable DICOM (no standard data elements)")
        uid = str(ds.get("SOPInstanceUID", "") or "") or None
        if meta is not None:
            age = patient_age_years(ds)
            if age is not None:
                meta["age_years"] = age
        if eligibility is not False:
            rules = eligibility if isinstance(eligibility, Eligibility) else Eligibility.default()
            try:
                rules.check(ds, name)
            except NotAssessableError as exc:
                # A radiograph without pixels is a damaged file (error), not an image the model cannot judge.
                if "PixelData" not in ds and exc.rule != "dicom_modality":
                    raise InvalidInputError(f"{name}: DICOM has no pixel data") from None
                raise
        if "PixelData" not in ds:
            raise InvalidInputError(f"{name}: DICOM has no pixel data")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InvalidInputError(f"{name}: multi-frame DICOM ({frames} frames); send one frame per image")
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            short = _truncated(ds)
            if short is not None:
                raise InvalidInputError(f"{name}: DICOM pixel data truncated: {short[0]} of {short[1]} bytes (the file "
                                        "was cut short in transfer or on disk; send it again)") from None
            raise InvalidInputError(f"{name}: cannot decode DICOM pixel data (transfer syntax {syntax}: "
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
                                    ) from None
        if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
            raise InvalidInputError(f"{name}: unsupported DICOM pixel shape {pixels.shape}")
        h, w = pixels.shape[:2]
        if h * w > MAX_PIXELS or min(h, w) < MIN_SIDE:
            raise InvalidInputError(f"{name}: DICOM image size {w}x{h} outside the accepted range")
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        chroma = 0.0
        if photometric == "PALETTE COLOR":  # indices into a colour table, never grey levels
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, ds)
        elif photometric.startswith("YBR") and pixels.ndim == 3:
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        if pixels.ndim == 3:
            chroma = chroma_of(pixels)
            values = pixels
        else:
            values = apply_modality_lut(pixels, ds)
            if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
                values = apply_voi_lut(values, ds, index=0)
    # The contract's conversion: luma for colour, NaN/Inf refused, min-max window to 0..255.
    gray = to_gray_u8(np.asarray(values, dtype=np.float64), name)
    if photometric == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: high values are dark
    return gray, uid, chroma


def _truncated(ds) -> tuple[int, int] | None:
    """(bytes present, bytes expected) when native (uncompressed) pixel data is shorter than its header says."""
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return None
        per_sample = (int(ds.BitsAllocated) + 7) // 8
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * per_sample
                    * int(ds.get("NumberOfFrames", 1) or 1))
        present = len(ds.PixelData)
    except Exception:  # noqa: BLE001 - a header too broken to say: the generic reason stands
        return None
    return (present, expected) if present < expected else None
