"""The third outcome: every refusal rule's path, a real chest X-ray passing every rule, and the statuses' invariants."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr.client import PneumoniaClient, Prediction
from cxr.core import contract, eligibility, imaging
from cxr.core.errors import CxrError, InvalidInputError, NotAssessableError
from cxr.train import ood_corpus
from tests.conftest import SHIPPED_MODELS, SHIPPED_REPOSITORY, synthetic_xray
from tests.test_dicom import _ramp, make_dicom


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rule(source: object, **kw: object) -> str:
    with pytest.raises(NotAssessableError) as info:
        imaging.preprocess(source, name="in.png", **kw)
    msg = str(info.value)
    assert msg.startswith("in.png: not assessable (") and "\n" not in msg
    return info.value.rule


@pytest.fixture(scope="module")
def embedded() -> PneumoniaClient:
    with PneumoniaClient(str(SHIPPED_REPOSITORY), protocol="embedded") as c:
        yield c


# -- pixel rules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(224, 224), (37, 40), (1000, 800), (2048, 2048)])
@pytest.mark.parametrize("level", [0, 128, 255])
def test_blank_images_are_not_assessable(size: tuple[int, int], level: int) -> None:
    assert _rule(_png(np.full(size, level, np.uint8))) == "blank_image"


def test_near_constant_and_constant_deep_arrays_are_blank() -> None:
    rng = np.random.default_rng(0)
    assert _rule(np.clip(100 + rng.normal(0, 2, (300, 300)), 0, 255).astype(np.uint8)) == "blank_image"
    assert _rule(np.full((300, 300), 3000, np.uint16)) == "blank_image"  # windowed to zeros before: now refused
    assert _rule(make_dicom(np.full((300, 260), 1234, np.uint16))) == "blank_image"


def test_colour_images_are_not_assessable() -> None:
    rgb = np.zeros((300, 300, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 200, 90  # an orange (skin, fundus) image
    assert _rule(_png(rgb + np.random.default_rng(0).integers(0, 40, rgb.shape, dtype=np.uint8))) == "colour_image"
    assert _rule(rgb) == "colour_image"


def test_grey_rgb_x_ray_is_not_colour() -> None:
    gray = np.asarray(synthetic_xray(1, pneumonia=False))
    rgb = np.stack([gray] * 3, axis=-1)
    out = imaging.preprocess(_png(rgb))  # three equal channels, as the Kaggle JPEGs: accepted
    assert out.shape == contract.IMAGE_SHAPE


@pytest.mark.parametrize("shape", [(100, 400), (1000, 120)])
def test_extreme_aspect_ratio_is_not_assessable(shape: tuple[int, int]) -> None:
    arr = np.asarray(synthetic_xray(2, pneumonia=True, size=(shape[1], shape[0])))
    assert _rule(_png(arr)) == "aspect_ratio"


def test_rules_can_be_turned_off_for_training_loaders() -> None:
    assert imaging.preprocess(_png(np.zeros((300, 300), np.uint8)), rules=False).max() == 0


def test_pixel_thresholds_lie_well_inside_real_x_rays() -> None:
    """Measured on the real films shipped in examples/ (two hospitals, JPEG, PNG and DICOM): each sits at least
    twice the blank limits above them, and its aspect ratio well under the limit; none is refused."""
    from PIL import Image

    from tests.conftest import REPO

    films = sorted((REPO / "examples").glob("*/*.jpeg")) + sorted((REPO / "examples").glob("*/nih_*.png"))
    assert len(films) == 8
    for f in films:
        gray = np.asarray(Image.open(f).convert("L"), np.float64)
        lo, hi = np.percentile(gray, [1, 99])
        assert gray.std() > 2 * contract.BLANK_STD_MIN and hi - lo > 2 * contract.BLANK_SPREAD_MIN, f
        assert max(gray.shape) / min(gray.shape) < contract.ASPECT_RATIO_MAX / 1.25, f
        imaging.preprocess(f)  # no rule refuses it
    imaging.preprocess(REPO / "examples" / "dicom" / "chest_dx.dcm")


# -- DICOM header rules ------------------------------------------------------------------------------------------

def _dicom(**attrs: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(_ramp())))
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("attrs", "rule"),
    [
        ({"Modality": "MR"}, "dicom_modality"),
        ({"Modality": "CT"}, "dicom_modality"),
        ({"Modality": None}, "dicom_modality"),
        ({"BodyPartExamined": "EXTREMITY"}, "dicom_body_part"),
        ({"ViewPosition": "LL"}, "dicom_view_position"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "dicom_photometric"),
        ({"NumberOfFrames": 2}, "dicom_frames"),
    ],
    ids=["mr", "ct", "no-modality", "extremity", "lateral", "palette", "two-frames"],
)
def test_dicom_header_rules(attrs: dict, rule: str) -> None:
    assert _rule(_dicom(**attrs)) == rule


@pytest.mark.parametrize("attrs", [{}, {"BodyPartExamined": "chest", "ViewPosition": "PA"}, {"Modality": "CR", "ViewPosition": "AP"}])
def test_eligible_dicom_passes(attrs: dict) -> None:
    assert imaging.preprocess(_dicom(**attrs)).shape == contract.IMAGE_SHAPE


def test_dicom_without_preamble_is_read() -> None:
    data = make_dicom(_ramp())
    assert data[128:132] == b"DICM"
    bare = data[132:]  # file meta group first, no preamble
    np.testing.assert_array_equal(imaging.preprocess(bare), imaging.preprocess(data))
    ds = pydicom.dcmread(io.BytesIO(data))
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=True)  # keeps ds's own preamble-less form when asked
    assert imaging.preprocess(buf.getvalue()).shape == contract.IMAGE_SHAPE


def test_damaged_dicom_is_one_line_and_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    data = make_dicom(_ramp())
    broken = data[: len(data) // 2]  # pixel data cut short
    with pytest.raises(InvalidInputError) as info:
        imaging.preprocess(broken, name="cut.dcm")
    assert "\n" not in str(info.value) and str(info.value).startswith("cut.dcm")
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out


def test_pydicom_test_files_other_modalities_are_refused() -> None:
    items = [i for i in ood_corpus.installed() if i.category == "dicom_header"]
    if not items:
        pytest.fail("pydicom-data is not installed (scripts/test.sh installs the dev extra with it)")
    for item in items:
        with pytest.raises((NotAssessableError, InvalidInputError)):
            imaging.preprocess(item.data, name=item.name)


def test_real_cr_chest_dicom_from_pydicom_data_passes_headers() -> None:
    files = ood_corpus._pydicom_files()
    if "RG1_UNCR.dcm" not in files:
        pytest.fail("pydicom-data is not installed")
    ds = pydicom.dcmread(files["RG1_UNCR.dcm"])
    assert eligibility.Eligibility.default().passes(ds)  # a CR chest film is eligible
    assert eligibility.Eligibility.default().passes(pydicom.dcmread(files["RG3_UNCR.dcm"])) is False  # the tibia


def test_eligibility_file_ships_with_the_model_and_is_served_in_the_config() -> None:
    for model in SHIPPED_MODELS:
        shipped = json.loads((SHIPPED_REPOSITORY / model / "eligibility.json").read_text())
        assert shipped == json.loads(eligibility.default_text())


def test_a_site_can_edit_the_rules() -> None:
    doc = json.loads(eligibility.default_text())
    doc["conditions"]["BodyPartExamined"]["allowed"].append("THORAX")
    rules = eligibility.Eligibility.from_json(json.dumps(doc))
    thorax = _dicom(BodyPartExamined="THORAX")
    assert _rule(thorax) == "dicom_body_part"
    assert imaging.preprocess(thorax, eligibility=rules).shape == contract.IMAGE_SHAPE


@pytest.mark.parametrize(
    "text",
    ["not json", json.dumps({"schema": "other"}), json.dumps({"schema": eligibility.SCHEMA, "conditions": {"X": {"rule": "nope", "allowed": ["A"]}}}),
     json.dumps({"schema": eligibility.SCHEMA, "conditions": {}})],
    ids=["not-json", "schema", "unknown-rule", "empty"],
)
def test_bad_eligibility_files_are_refused(text: str) -> None:
    with pytest.raises(CxrError, match="invalid eligibility rules"):
        eligibility.Eligibility.from_json(text)


# -- the learned OOD score, end to end in the client (embedded) ----------------------------------------------------

def test_generated_non_chest_inputs_get_no_label(embedded: PneumoniaClient) -> None:
    items = list(ood_corpus.generated())
    preds = embedded.predict([i.data for i in items])
    answered = [i.name for i, p in zip(items, preds) if p.status is contract.Status.OK]
    assert not answered, f"labelled: {answered}"
    rules = {p.rule for p in preds if p.status is contract.Status.NOT_ASSESSABLE}
    assert {"blank_image", "colour_image", "out_of_distribution"} <= rules
    assert all(f"({p.rule})" in (p.reason or "") for p in preds if p.rule)
    for p in preds:
        assert p.label is None and p.probability is None and p.reason and "\n" not in p.reason


def test_ood_threshold_comes_from_the_served_config(embedded: PneumoniaClient) -> None:
    card = json.loads((SHIPPED_REPOSITORY / "pneumonia" / "model_card.json").read_text())
    assert embedded.info.ood_threshold == pytest.approx(card["ood"]["threshold"], rel=1e-7)
    assert embedded.info.outputs == contract.OUTPUT_NAMES


def _real_xrays() -> list[Path]:
    """The real chest films of examples/ (JPEG, PNG and DICOM, two hospitals), with or without ../shared."""
    from tests.conftest import REPO

    ex = REPO / "examples"
    return sorted(ex.glob("NORMAL/*")) + sorted(ex.glob("PNEUMONIA/*")) + [ex / "dicom" / "chest_dx.dcm"]


def test_real_chest_x_rays_pass_every_rule(embedded: PneumoniaClient) -> None:
    files = _real_xrays()
    preds = embedded.predict(files)
    bad = [(p.source, p.reason) for p in preds if p.status is not contract.Status.OK]
    assert not bad
    for p in preds:
        assert p.label in contract.LABELS and p.label == contract.label_for(p.probability, p.threshold)
        assert p.ood_score is not None and p.ood_score <= p.ood_threshold


def test_real_x_rays_inverted_are_out_of_distribution(embedded: PneumoniaClient) -> None:
    files = _real_xrays()[:6]
    inverted = [_png(255 - np.asarray(Image.open(f).convert("L"))) for f in files]
    preds = embedded.predict(inverted)
    assert all(p.status is contract.Status.NOT_ASSESSABLE and "out_of_distribution" in (p.reason or "") for p in preds)


# -- the Prediction contract -----------------------------------------------------------------------------------------

def test_prediction_invariants() -> None:
    m = {"threshold": 0.4, "model_name": "m", "model_version": "1"}
    ok = Prediction(source="a", status=contract.Status.OK, label="Normal", probability=0.1, **m)
    assert ok.ok and ok.error is None and str(ok.status) == "ok"
    blank = contract.Refusal("blank_image", 3.5, contract.BLANK_STD_MIN, "grey-level std 3.5 (min 8.0)")
    na = Prediction(source="b", status="not_assessable", label=None, probability=None,
                    reason="b: not assessable (blank_image): x", refusal=blank, **m)
    assert na.status is contract.Status.NOT_ASSESSABLE and not na.ok and na.error is None and na.rule == "blank_image"
    with pytest.raises(ValueError):  # no refusal
        Prediction(source="b", status="not_assessable", label=None, probability=None, reason="b: x",
                   **m)
    with pytest.raises(ValueError):
        contract.Refusal("made_up")
    with pytest.raises(ValueError):  # a refusal with an answer
        Prediction(source="b", status="ok", label="Normal", probability=0.1, refusal=blank, **m)
    err = Prediction(source="c", status=contract.Status.ERROR, label=None, probability=None, reason="c: unreadable",
                     retryable=True, **m)
    assert err.error == "c: unreadable"
    with pytest.raises(ValueError):  # + label
        Prediction(source="d", status=contract.Status.NOT_ASSESSABLE, label="Normal", probability=0.2, reason="why",
                   refusal=blank, **m)
    with pytest.raises(ValueError):
        Prediction(source="e", status=contract.Status.OK, label="Normal", probability=0.2, reason="a reason", **m)
    with pytest.raises(ValueError):
        Prediction(source="f", status=contract.Status.OK, label="Normal", probability=0.2, retryable=True, **m)


def test_prediction_is_built_by_keyword_and_read_by_name() -> None:
    """A field added to Prediction cannot shift positional arguments or tuple reads: there are none."""
    with pytest.raises(TypeError):
        Prediction("a", contract.Status.OK, "Normal", 0.1, 0.4, "m", "1")
    ok = Prediction(source="a", status=contract.Status.OK, label="Normal", probability=0.1, threshold=0.4,
                    model_name="m", model_version="1")
    with pytest.raises(TypeError):
        ok[0]
    with pytest.raises(TypeError):
        source, *_ = ok


def test_decision_and_ood_rules_live_in_the_contract() -> None:
    assert contract.label_for(0.4, 0.4) == "Pneumonia" and contract.label_for(0.39, 0.4) == "Normal"
    assert contract.is_out_of_distribution(10.0, 9.9) and not contract.is_out_of_distribution(9.9, 9.9)
    assert contract.is_out_of_distribution(float("nan"), 9.9) and not contract.is_out_of_distribution(1e9, None)
    assert set(contract.RULES) >= {"blank_image", "colour_image", "aspect_ratio", "out_of_distribution", "dicom_modality"}


@pytest.mark.parametrize(("p", "text"), [(0.9997, "> 0.999"), (0.0004, "< 0.001"), (0.0331, "0.033"), (0.999, "0.999")])
def test_probabilities_are_never_rounded_to_certainty(p: float, text: str) -> None:
    assert contract.format_probability(p) == text


def test_unjudgeable_copies_of_chest_films_join_the_body_part_fit() -> None:
    """Inverted and rotated training films are on the non-chest side of the body-part check, half of them held out
    to validate it."""
    from cxr.export.body_part import combined, unjudgeable_chest

    rng = np.random.default_rng(0)
    chest = rng.integers(0, 256, size=(30, *contract.IMAGE_SHAPE), dtype=np.uint8)
    non = unjudgeable_chest(chest, [f"film_{i}.png" for i in range(30)], per_kind=10)
    assert non.images.shape == (30, *contract.IMAGE_SHAPE)
    assert sorted(set(non.kinds)) == ["unjudgeable:inverted", "unjudgeable:rotated_180", "unjudgeable:rotated_90"]
    inverted = non.images[[k == "unjudgeable:inverted" for k in non.kinds]]
    assert all(any(np.array_equal(255 - x, c) for c in chest) for x in inverted)
    assert 0 < non.fitting.sum() < len(non.fitting)  # a held-out half
    both = combined(non, non)
    assert len(both.kinds) == 60 and both.fitting.shape == (60,)
