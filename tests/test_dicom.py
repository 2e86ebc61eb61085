"""DICOM decoding: built with pydicom from arrays, never read from disk fixtures."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr.core import contract, imaging
from cxr.core.errors import InvalidInputError

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def make_dicom(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", bits: int = 16, slope: float = 1.0,
               intercept: float = 0.0, window: tuple[float, float] | None = None, frames: int = 1) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "PID-12345"
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        if frames > 1:
            ds.NumberOfFrames = frames
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _ramp(h: int = 300, w: int = 260, hi: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, hi, w), (h, 1)).astype(np.uint16)


def test_12bit_monochrome2_and_uid() -> None:
    data = make_dicom(_ramp())
    out, meta = imaging.preprocess_with_meta(data)
    assert out.shape == contract.IMAGE_SHAPE and out.dtype == np.uint8
    assert out[:, 0, 0].mean() < 10 and out[:, -1, 0].mean() > 245  # dark left, bright right
    assert meta["sop_instance_uid"] == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID


def test_monochrome1_is_inverted() -> None:
    m2 = imaging.preprocess(make_dicom(_ramp()))
    m1 = imaging.preprocess(make_dicom(_ramp(), photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1.astype(int), 255 - m2.astype(int), atol=1)


def test_window_is_applied() -> None:
    full = imaging.preprocess(make_dicom(_ramp()))
    narrow = imaging.preprocess(make_dicom(_ramp(), window=(2048, 1024)))
    # outside the window the image saturates: more pure black and pure white columns
    assert (narrow[0, :, 0] == 0).sum() > (full[0, :, 0] == 0).sum() + 20
    assert (narrow[0, :, 0] == 255).sum() > (full[0, :, 0] == 255).sum() + 20


def test_rescale_slope_intercept_keep_order() -> None:
    a = imaging.preprocess(make_dicom(_ramp(), slope=2.0, intercept=-1024))
    b = imaging.preprocess(make_dicom(_ramp()))
    np.testing.assert_allclose(a.astype(int), b.astype(int), atol=1)  # a linear rescale is windowed away


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (make_dicom(None), "no pixel data"),
        (make_dicom(_ramp(10, 10)), "outside the accepted range"),
        (b"\0" * 128 + b"DICM" + b"garbage" * 5, "DICOM"),
    ],
    ids=["no-pixels", "tiny", "corrupt"],
)
def test_dicom_violations(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        imaging.preprocess(data, name="scan.dcm")
    msg = str(info.value)
    assert reason in msg and msg.startswith("scan.dcm") and "Secret" not in msg and "PID-12345" not in msg


def test_patient_tags_never_logged() -> None:
    """pydicom's logger does not propagate to the root logger, so listen on it directly, in pydicom's debug mode
    (which logs every element's value); the positive control shows the probe hears a plain read."""
    import io
    import logging

    import pydicom

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    log = logging.getLogger("pydicom")
    log.addHandler(handler)
    pydicom.config.debug(True)
    try:
        data = make_dicom(_ramp())
        list(pydicom.dcmread(io.BytesIO(data), force=True))
        assert "Secret" in buf.getvalue()  # control: an unguarded read does log patient names
        buf.seek(0)
        buf.truncate()
        imaging.preprocess(data)
        assert "Secret" not in buf.getvalue() and "PID-12345" not in buf.getvalue()
    finally:
        pydicom.config.debug(False)
        log.removeHandler(handler)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_transfer_syntaxes(syntax: str) -> None:
    import pydicom.uid

    ds = pydicom.dcmread(io.BytesIO(make_dicom(_ramp())))
    ds.compress(getattr(pydicom.uid, syntax))  # RLE: pydicom; JPEG 2000: the pylibjpeg-openjpeg plugin
    buf = io.BytesIO()
    ds.save_as(buf)
    assert pydicom.dcmread(io.BytesIO(buf.getvalue())).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(imaging.preprocess(buf.getvalue()), imaging.preprocess(make_dicom(_ramp())))
