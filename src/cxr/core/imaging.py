"""Decoding: any accepted input (path, bytes, PIL image, array; JPEG, PNG, ..., DICOM) to the model's input.

:func:`preprocess` is the one function that turns an image (any size, bit depth or colour mode) into the
contract's ``uint8 (224, 224, 1)`` tensor, applying the eligibility and pixel rules on the way. Geometry
(decode, grayscale, resize) happens here; intensity scaling happens inside the model graph.

This module depends on numpy and Pillow (and pydicom for DICOM) only, so a client-only install can use it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr.core.contract import IMAGE_SIZE, MAX_FILE_BYTES
from cxr.core.errors import InvalidInputError
from cxr.core.pixels import assess_pixels, check_size, chroma_of, resize, to_gray_u8

__all__ = ["ImageSource", "describe", "is_dicom", "decode_gray", "preprocess", "preprocess_with_meta"]

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]


def describe(source: ImageSource) -> str:
    """Short name of an input for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {source.shape}>"
    return f"<{type(source).__name__}>"


def is_dicom(head: bytes) -> bool:
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


def read_bytes(source: str | os.PathLike | bytes | bytearray, name: str) -> bytes:
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


def _decode_pil(image: Image.Image, name: str, *, draft: bool) -> tuple[np.ndarray, float]:
    check_size(image.width, image.height, name)
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
    return to_gray_u8(array, name), chroma


def preprocess_with_meta(
    source: ImageSource, *, name: str | None = None, draft: bool = True, rules: bool = True,
    eligibility: object | None = None,
) -> tuple[np.ndarray, dict]:
    """Turn one image into the model's input; also return metadata (``sop_instance_uid``, ``age_years`` for DICOM).

    Input contract:
        ``source`` is a path, encoded bytes (JPEG, PNG, BMP, TIFF, GIF, WebP or
        DICOM), a ``PIL.Image``, or a pixel array. Arrays are ``(H, W)``,
        ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``; ``uint8`` is used as is,
        other integer dtypes and finite floats are min-max windowed to 0..255.
        Sides must be at least :data:`~cxr.core.contract.MIN_SIDE` and the area at most
        :data:`~cxr.core.contract.MAX_PIXELS`. Multi-frame images are refused.

    Eligibility (``rules=True``): DICOM headers are checked first against the
    eligibility rules (:mod:`cxr.core.eligibility`), then the pixel rules of
    :func:`assess_pixels` (aspect ratio, colour, blank). A readable input that
    breaks a rule raises :class:`NotAssessableError` naming the rule. The
    learned out-of-distribution rule needs the model and is applied by the
    client on the served ``ood_score``.

    Output contract:
        ``numpy.ndarray`` of dtype ``uint8``, shape :data:`~cxr.core.contract.IMAGE_SHAPE`
        ``(224, 224, 1)``, values 0..255 (grayscale, aspect ratio not kept, as
        the training data).

    Args:
        source: The image.
        name: Name used in error messages (defaults to the path or a summary).
        draft: Let JPEG decoding downscale in the DCT domain (much faster on
            multi-megapixel X-rays; differences are a few grey levels).
        rules: Apply the eligibility and pixel rules (training data loaders turn them off).
        eligibility: DICOM rules (:class:`cxr.core.eligibility.Eligibility`); default: the shipped file.

    Raises:
        InvalidInputError: The input cannot be read or violates the contract.
        NotAssessableError: The input is readable but breaks an eligibility rule.
    """
    name = name or describe(source)
    gray, meta, chroma = decode_gray(source, name=name, draft=draft, eligibility=eligibility if rules else False)
    if rules:
        assess_pixels(gray, name, chroma=chroma)
    return resize(gray), meta


def decode_gray(
    source: ImageSource, *, name: str | None = None, draft: bool = False, eligibility: object | None = False,
) -> tuple[np.ndarray, dict, float]:
    """Decode any accepted input to 2-D uint8 grayscale at its own size (no pixel rules, no resize).

    Returns the image, its metadata (``sop_instance_uid`` and ``age_years`` for DICOM, when stated) and its
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
        check_size(source.shape[1], source.shape[0], name)
        chroma = chroma_of(source) if source.ndim == 3 and source.shape[2] >= 3 else 0.0
        return to_gray_u8(source, name), {}, chroma
    if isinstance(source, Image.Image):
        gray, chroma = _decode_pil(source, name, draft=draft)
        return gray, {}, chroma
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise InvalidInputError(f"{name}: unsupported input type {type(source).__name__}")
    data = read_bytes(source, name)
    if is_dicom(data[:132]):
        from cxr.core.dicom import read_dicom

        header: dict = {}
        gray, uid, chroma = read_dicom(data, name=name, eligibility=eligibility, meta=header)
        return gray, ({"sop_instance_uid": uid} if uid else {}) | header, chroma
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
