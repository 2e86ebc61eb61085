"""The preprocessing contract: shapes, dtypes, ranges, and every violation path."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr.core import contract, imaging
from cxr.core.errors import CxrError, InvalidInputError


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 300, h: int = 260) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)


def _check(out: np.ndarray) -> None:
    assert out.shape == contract.IMAGE_SHAPE == (224, 224, 1)
    assert out.dtype == np.uint8


@pytest.mark.parametrize(
    "make",
    [
        lambda: _encode(Image.fromarray(_gradient()), "JPEG"),
        lambda: _encode(Image.fromarray(_gradient()), "PNG"),
        lambda: _encode(Image.fromarray(np.dstack([_gradient()] * 3)), "JPEG"),
        lambda: _encode(Image.fromarray(np.dstack([_gradient()] * 3 + [np.full((260, 300), 255, np.uint8)])), "PNG"),
        lambda: _encode(Image.fromarray(_gradient()).convert("P"), "PNG"),
        lambda: _encode(Image.fromarray(np.dstack([_gradient()] * 3)).convert("CMYK"), "JPEG"),
        lambda: _encode(Image.fromarray(_gradient()).convert("1"), "PNG"),
        lambda: _encode(Image.fromarray(_gradient().astype(np.uint16) * 16), "PNG"),  # 12-bit data in 16-bit PNG
        lambda: _encode(Image.fromarray(_gradient()), "TIFF"),
        lambda: _encode(Image.fromarray(_gradient()), "BMP"),
    ],
    ids=["jpeg-L", "png-L", "jpeg-RGB", "png-RGBA", "png-P", "jpeg-CMYK", "png-1bit", "png-16bit", "tiff", "bmp"],
)
def test_encoded_inputs_meet_the_output_contract(make) -> None:  # type: ignore[no-untyped-def]
    out = imaging.preprocess(make())
    _check(out)
    assert out.max() > out.min()  # content survives


def test_16bit_is_windowed_to_full_range() -> None:
    arr = np.linspace(1000, 4000, 300 * 260).reshape(260, 300).astype(np.uint16)
    out = imaging.preprocess(_encode(Image.fromarray(arr), "PNG"))
    assert out.min() <= 2 and out.max() >= 253


def test_grayscale_8bit_is_kept_exactly_at_model_size() -> None:
    arr = _gradient(224, 224)
    np.testing.assert_array_equal(imaging.preprocess(arr)[:, :, 0], arr)
    np.testing.assert_array_equal(imaging.preprocess(_encode(Image.fromarray(arr), "PNG"))[:, :, 0], arr)


def test_rgb_with_equal_channels_equals_grayscale() -> None:
    arr = _gradient()
    gray = imaging.preprocess(arr)
    rgb = imaging.preprocess(np.dstack([arr] * 3))
    np.testing.assert_array_equal(gray, rgb)


def test_path_and_bytes_agree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _encode(Image.fromarray(_gradient(1600, 1400)), "JPEG")
    p = tmp_path / "x.jpeg"
    p.write_bytes(data)
    np.testing.assert_array_equal(imaging.preprocess(p), imaging.preprocess(data))


def test_jpeg_draft_decoding_is_close_to_full_decoding() -> None:
    rng = np.random.default_rng(0)
    arr = np.clip(_gradient(2000, 1800).astype(float) + rng.normal(0, 5, (1800, 2000)), 0, 255).astype(np.uint8)
    data = _encode(Image.fromarray(arr), "JPEG", quality=95)
    fast = imaging.preprocess(data, draft=True).astype(int)
    full = imaging.preprocess(data, draft=False).astype(int)
    assert np.abs(fast - full).mean() < 3.0


def test_float_array_in_unit_range_and_bool() -> None:
    _check(imaging.preprocess(np.random.default_rng(0).random((100, 120))))
    _check(imaging.preprocess(np.random.default_rng(0).random((100, 120)) > 0.5))


def _png_with_claimed_size(w: int, h: int) -> bytes:
    """A tiny valid PNG whose header claims w x h (a decompression bomb)."""
    data = bytearray(_encode(Image.new("L", (40, 40)), "PNG"))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all" * 10, "not an image"),
        (_encode(Image.fromarray(_gradient()), "JPEG")[:400], "corrupt or truncated"),
        (_png_with_claimed_size(100_000, 100_000), "too large"),
        (_encode(Image.new("L", (1, 1)), "PNG"), "too small"),
        (_encode(Image.new("L", (4000, 8)), "PNG"), "too small"),
        (np.full((64, 64), np.nan), "NaN or Inf"),
        (np.zeros((2, 64, 64, 3), np.uint8), "2-D or 3-D"),
        (np.zeros((64, 64, 2), np.uint8), "channel count"),
        (np.zeros((64, 64), np.complex64), "unsupported pixel dtype"),
        (12345, "unsupported input type"),
    ],
    ids=["empty", "text", "truncated-jpeg", "bomb", "1x1", "thin", "nan", "4d", "2ch", "complex", "int"],
)
def test_violations_raise_one_line_errors_naming_the_input(source, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError) as info:
        imaging.preprocess(source, name="case.x")  # type: ignore[arg-type]
    msg = str(info.value)
    assert reason in msg and msg.startswith("case.x") and "\n" not in msg
    assert isinstance(info.value, CxrError)


def test_multiframe_gif_is_refused() -> None:
    frames = [Image.fromarray(_gradient()), Image.fromarray(255 - _gradient())]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidInputError, match="multi-frame"):
        imaging.preprocess(buf.getvalue())


def test_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match="cannot read file"):
        imaging.preprocess(tmp_path / "nope.jpeg")


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        (np.zeros((2, 224, 224, 1), np.float32), "dtype"),
        (np.zeros((2, 224, 224, 3), np.uint8), "shape"),
        (np.zeros((224, 224, 1), np.uint8), "shape"),
        (np.zeros((0, 224, 224, 1), np.uint8), "shape"),
        (np.zeros((9, 224, 224, 1), np.uint8), "exceeds max_batch_size"),
        ([1, 2, 3], "numpy.ndarray"),
    ],
)
def test_validate_batch_violations(batch, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=reason):
        contract.validate_batch(batch, max_batch_size=8)  # type: ignore[arg-type]


def test_validate_batch_accepts_contract_batch() -> None:
    b = np.zeros((3, 224, 224, 1), np.uint8)
    assert contract.validate_batch(b) is b


def test_label_for_threshold_is_inclusive() -> None:
    assert contract.label_for(0.3, 0.3) == "Pneumonia"
    assert contract.label_for(0.2999, 0.3) == "Normal"


# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


# guards cxr.core.contract: population_for_age: the 18-year boundary and bad ages
def test_the_population_of_an_age() -> None:
    assert [contract.population_for_age(a) for a in (0, 17.9, 18, 80)] == ["pediatric", "pediatric", "adult", "adult"]
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match=rf"^age must be >= 0 years, got {bad}$"):
            contract.population_for_age(bad)


# guards cxr.core.contract: format_probability: the ends of the scale
def test_probabilities_for_people_at_the_ends() -> None:
    assert [contract.format_probability(p) for p in (0.0009, 0.001, 0.5, 0.999, 0.9991)] == [
        "< 0.001", "0.001", "0.500", "0.999", "> 0.999"]


# guards cxr.core.contract: validate_batch: batch sizes and messages
def test_validate_batch_sizes_and_messages() -> None:
    one = np.zeros((1, *contract.IMAGE_SHAPE), np.uint8)
    assert contract.validate_batch(one) is one
    two = np.zeros((2, *contract.IMAGE_SHAPE), np.uint8)
    assert contract.validate_batch(two, max_batch_size=2) is two
    with pytest.raises(InvalidInputError, match=r"^batch: batch of 2 exceeds max_batch_size 1$"):
        contract.validate_batch(two, max_batch_size=1)
    with pytest.raises(InvalidInputError, match=r"^batch: expected numpy.ndarray, got list$"):
        contract.validate_batch([1])  # type: ignore[arg-type]
    shape = ", ".join(map(str, contract.IMAGE_SHAPE))
    with pytest.raises(InvalidInputError, match=rf"^batch: shape must be \(N, {shape}\), got \(0, {shape}\)$"):
        contract.validate_batch(np.zeros((0, *contract.IMAGE_SHAPE), np.uint8))


# guards cxr.core.contract: priority_level/Refusal/not_assessable: their validation
def test_priorities_and_refusals_validate_with_their_message() -> None:
    assert contract.priority_level("urgent") < contract.priority_level("routine")
    with pytest.raises(ValueError, match=r"^priority must be one of urgent, routine, got 'soon'$"):
        contract.priority_level("soon")
    with pytest.raises(ValueError, match=r"^unknown rule 'nope'$"):
        contract.Refusal("nope")
    with pytest.raises(ValueError, match="^refusal value must be a number or text, got list$"):
        contract.Refusal("blank_image", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^refusal limit must be a number or text, got dict$"):
        contract.not_assessable("x", "blank_image", "d", value=1.0, limit={})  # type: ignore[arg-type]
    e = contract.not_assessable("x", "blank_image", "std low", value=2.0, limit=8.0)
    assert contract.Refusal.of(e) == contract.Refusal("blank_image", 2.0, 8.0, "std low")

