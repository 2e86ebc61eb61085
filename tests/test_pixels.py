"""The pixel rules (cxr.core.pixels): grey conversion, the size guards, the aspect-ratio, colour and blank rules."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.core import contract, pixels
from cxr.core.errors import InvalidInputError, NotAssessableError

# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


def _refused_by(gray: np.ndarray, chroma: float = 0.0) -> tuple[str, str, object, object]:
    with pytest.raises(NotAssessableError) as e:
        pixels.assess_pixels(gray, "x.png", chroma=chroma)
    return str(e.value), e.value.rule, e.value.value, e.value.limit


def _textured(h: int, w: int) -> np.ndarray:
    return (np.indices((h, w)).sum(axis=0) * 7 % 256).astype(np.uint8)


# guards cxr.core.pixels: to_gray_u8: every channel layout and dtype
def test_grey_conversion_of_every_layout() -> None:
    assert pixels.to_gray_u8(np.full((2, 2, 1), 9, np.uint8), "x").tolist() == [[9, 9], [9, 9]]
    red = np.zeros((1, 2, 3), np.uint8)
    red[0, 0] = (255, 0, 0)  # ITU-R 601 luma of pure red: 76.245
    assert pixels.to_gray_u8(red, "x").tolist() == [[76, 0]]
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (0, 255, 0, 255)
    assert pixels.to_gray_u8(rgba, "x").tolist() == [[150, 0]]
    deep = np.zeros((1, 2, 3), np.uint16)
    deep[0, 0] = (0, 0, 4000)  # float luma, windowed to the full range
    assert pixels.to_gray_u8(deep, "x").tolist() == [[255, 0]]
    assert pixels.to_gray_u8(np.array([[True, False]]), "x").tolist() == [[255, 0]]
    assert pixels.to_gray_u8(np.array([[0, 1000, 500]], np.uint16), "x").tolist() == [[0, 255, 128]]
    assert pixels.to_gray_u8(np.array([[0.0, 0.25, 1.0]]), "x").tolist() == [[0, 64, 255]]
    assert pixels.to_gray_u8(np.full((2, 2), 700, np.uint16), "x").tolist() == [[0, 0], [0, 0]]
    out = pixels.to_gray_u8(np.array([[3, 4]], np.int32), "x")
    assert out.dtype == np.uint8 and out.tolist() == [[0, 255]]


# guards cxr.core.pixels: to_gray_u8: what it refuses, with its message
@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((2, 2, 5), np.uint8), "x: unsupported channel count 5"),
    (np.zeros((2, 2, 2), np.uint8), "x: unsupported channel count 2"),
    (np.zeros(4, np.uint8), "x: expected a 2-D or 3-D pixel array, got shape (4,)"),
    (np.zeros((2, 2), np.complex128), "x: unsupported pixel dtype complex128"),
    (np.array([[0.0, np.nan]]), "x: pixel data contains NaN or Inf"),
    (np.array([[0.0, np.inf]]), "x: pixel data contains NaN or Inf"),
])
def test_grey_conversion_refuses_what_it_cannot_read(array: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        pixels.to_gray_u8(array, "x")
    assert str(e.value) == message


# guards cxr.core.pixels: assess_pixels: the aspect-ratio limit (2.5 accepted)
def test_the_aspect_ratio_rule_at_its_limit() -> None:
    pixels.assess_pixels(_textured(100, 250), "x.png")  # 2.5 exactly: accepted
    pixels.assess_pixels(_textured(250, 100), "x.png")
    assert _refused_by(_textured(100, 251)) == (
        "x.png: not assessable (aspect_ratio): 251x100 px, ratio 2.51 > 2.5", "aspect_ratio", 2.51, 2.5)


# guards cxr.core.pixels: assess_pixels: the chroma limit
def test_the_colour_rule_at_its_limit() -> None:
    pixels.assess_pixels(_textured(64, 64), "x.png", chroma=12.0)
    assert _refused_by(_textured(64, 64), chroma=12.5) == (
        "x.png: not assessable (colour_image): mean chroma 12.5 > 12.0", "colour_image", 12.5, 12.0)


# guards cxr.core.pixels: assess_pixels: the blank rule's two measures
def test_the_blank_rule_reports_the_measure_that_failed() -> None:
    flat = np.full((64, 64), 120, np.uint8)
    assert _refused_by(flat) == ("x.png: not assessable (blank_image): grey-level std 0.0 (min 8.0), 1-99% spread 0 "
                                 "(min 32)", "blank_image", 0.0, 8.0)
    # high enough std but a narrow spread: two levels 20 apart, std 10
    two = np.full((64, 64), 100, np.uint8)
    two[:, 32:] = 120
    message, rule, value, limit = _refused_by(two)
    assert (rule, value, limit) == ("blank_image", 20.0, 32.0) and "grey-level std 10.0" in message
    # a spread of exactly 32 with std above 8 is assessable
    wide = np.full((64, 64), 100, np.uint8)
    wide[:, 32:] = 132
    pixels.assess_pixels(wide, "x.png")


# guards cxr.core.pixels: chroma_of: grey, colour, alpha, deep and sampled images
def test_chroma_of_grey_colour_and_deep_images() -> None:
    assert pixels.chroma_of(np.full((4, 4, 3), 77, np.uint8)) == 0.0
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert pixels.chroma_of(red) == 255.0
    deep = np.zeros((4, 4, 4), np.uint16)
    deep[..., 1] = 65535  # the alpha channel is not a colour
    deep[..., 3] = 1
    assert pixels.chroma_of(deep) == pytest.approx(255.0)
    big = np.zeros((1000, 1000, 3), np.uint8)
    big[::2, ::2, 0] = 200  # sampled every 2nd pixel (at most ~250k): only the coloured ones are seen
    assert pixels.chroma_of(big) == pytest.approx(200.0)


# guards cxr.core.pixels: check_size: both limits and their messages
def test_the_size_guards_at_their_limits() -> None:
    pixels.check_size(32, 32, "x")
    pixels.check_size(8000, 5000, "x")  # 40,000,000 pixels exactly
    with pytest.raises(InvalidInputError) as e:
        pixels.check_size(8001, 5000, "x")
    assert str(e.value) == ("x: image too large (8001x5000 = 40005000 pixels > 40000000); refusing to decode "
                            "(decompression-bomb guard)")
    with pytest.raises(InvalidInputError) as e:
        pixels.check_size(31, 500, "x")
    assert str(e.value) == "x: image too small (31x500); need at least 32 px per side"


# guards cxr.core.pixels: resize: shape and dtype of the model input
def test_resize_to_the_model_input() -> None:
    same = _textured(224, 224)
    assert np.array_equal(pixels.resize(same)[..., 0], same)
    out = pixels.resize(_textured(100, 300))
    assert out.shape == contract.IMAGE_SHAPE and out.dtype == np.uint8

