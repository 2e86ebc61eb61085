"""The typed model folder: the card, the served parameters and the provenance read and written in one place."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from cxr.core.errors import CxrError, ModelIntegrityError
from cxr.core.model_dir import CARD_FILE, ModelCard, ModelDir, ServedParams, model_dirs
from cxr.export import repository
from tests.conftest import REPO, SHIPPED_MODELS, SHIPPED_REPOSITORY


def test_the_shipped_folders_read_typed() -> None:
    names = [d.name for d in model_dirs(SHIPPED_REPOSITORY)]
    assert names == list(SHIPPED_MODELS)
    for folder in model_dirs(SHIPPED_REPOSITORY):
        raw = json.loads((folder.path / "model_card.json").read_text())
        card = folder.card()
        assert card.threshold == raw["calibration"]["threshold"] and card.sha256 == raw["sha256"]
        assert card.ood_threshold == raw["ood"]["threshold"] and card.file == raw["file"]
        assert folder.verify() == folder.path / raw["file"]
        # what the config serves is what the card says, read back with the codec that wrote it: same numbers
        served = folder.served_params()
        assert served == repository.served_params(folder.path)
        assert (served.threshold, served.ood_threshold, served.sha256) == (card.threshold, card.ood_threshold, card.sha256)
        assert folder.reference() is not None and folder.provenance()


def test_a_changed_graph_and_a_missing_card_are_refused(tmp_path: Path) -> None:
    dst = tmp_path / "pneumonia"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", dst)
    folder = ModelDir(dst)
    onnx = folder.onnx_path()
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="does not match model card"):
        folder.verify()
    (dst / "model_card.json").unlink()
    with pytest.raises(CxrError, match="no model_card.json"):
        folder.card()
    assert model_dirs(tmp_path) == []


def test_card_and_params_are_validated() -> None:
    with pytest.raises(CxrError, match="sha256"):
        ModelCard({"calibration": {"threshold": 0.3}})
    with pytest.raises(CxrError, match="threshold"):
        ModelCard({"sha256": "ab" * 32, "calibration": {"threshold": 1.3}})
    assert ModelCard({"sha256": "ab" * 32, "calibration": {"threshold": 0.3}}).file == "1/model.onnx"
    with pytest.raises(ValueError):
        ServedParams(threshold=0.3, labels=("Normal",))
    # Triton's JSON form ({"string_value": ...}) and plain strings read the same
    p = ServedParams(threshold=0.3, sha256="ab" * 32, ood_threshold=12.5)
    wrapped = {k: {"string_value": v} for k, v in p.as_parameters().items()}
    assert ServedParams.from_parameters(wrapped) == ServedParams.from_parameters(p.as_parameters()) == p


def test_writing_a_card_validates_it_first(tmp_path: Path) -> None:
    folder = ModelDir(tmp_path)
    with pytest.raises(TypeError, match="ModelCard"):  # a raw dict is not a card
        folder.write_card({"sha256": "ab" * 32, "calibration": {"threshold": 0.3}})  # type: ignore[arg-type]
    card = ModelCard({"sha256": "ab" * 32, "calibration": {"threshold": 0.3}})
    with pytest.raises(CxrError):
        folder.write_card(card.replace(sha256="short"))
    assert not folder.has_card()
    folder.write_card(card, "# card\n")
    assert folder.card().threshold == 0.3 and (tmp_path / "MODEL_CARD.md").read_text() == "# card\n"
    assert json.loads((tmp_path / "model_card.json").read_text()) == {"sha256": "ab" * 32,
                                                                      "calibration": {"threshold": 0.3}}


def test_card_edits_return_new_validated_cards() -> None:
    points = {"adult": {"threshold": 0.2}, "pediatric": {"threshold": 0.4}}
    card = ModelCard({"model": "m", "sha256": "ab" * 32, "calibration": {"threshold": 0.2, "rule": "r"},
                      "operating_points": points, "default_operating_point": "adult", "commands": ["cxr export"]})
    # sections read as copies: editing one changes no card
    card.calibration["threshold"] = 0.9
    card.operating_points["adult"]["threshold"] = 0.9
    assert card.threshold == 0.2 and card.operating_points["adult"]["threshold"] == 0.2
    with pytest.raises(ValueError, match="no section calibraton"):
        card.replace(calibraton={"threshold": 0.3})
    with pytest.raises(CxrError, match="default operating point"):  # the served threshold stays the default's
        card.with_calibration(threshold=0.3)
    moved = card.with_default_point("pediatric")
    assert (moved.threshold, moved.default_operating_point, card.threshold) == (0.4, "pediatric", 0.2)
    assert moved.calibration["rule"] == "operating point pediatric (site default; was adult)"
    assert card.with_default_point("adult") is card
    with pytest.raises(CxrError, match="operating point 'child': m has adult, pediatric"):
        card.with_default_point("child")
    single = card.replace(operating_points=None, default_operating_point=None).with_calibration(threshold=0.3)
    assert single.operating_points == {} and single.default_operating_point == "" and single.threshold == 0.3
    assert card.with_command("cxr claims").commands == ("cxr export", "cxr claims")
    assert card.with_command("cxr export", once=True) is card and card.with_command("") is card
    assert card.with_outputs([{"name": "probability"}]).data["contract"] == {"outputs": [{"name": "probability"}]}


def _raw_card_access(text: str) -> list[str]:
    """Lines of a module that open ``model_card.json`` by name or read a card as a dict (``card[...]``,
    ``card.get(...)``, ``card.data``): the card is read and written through :class:`ModelCard` instead."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(CARD_FILE)
                and not any(ch.isspace() for ch in node.value)):
            found.append(f"{node.lineno}: the card's file name")  # a path, not a sentence naming the file
        dict_read = isinstance(node, ast.Subscript) or (
            isinstance(node, ast.Attribute) and node.attr in ("get", "setdefault", "pop", "update", "data"))
        target = getattr(node, "value", None) if dict_read else None
        if isinstance(target, ast.Name) and target.id.endswith("card"):
            found.append(f"{node.lineno}: {ast.unparse(node)[:60]}")
    return found


def test_the_card_is_read_and_written_only_through_model_card() -> None:
    modules = [*(REPO / "src" / "cxr").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    offenders = {str(p.relative_to(REPO)): _raw_card_access(p.read_text()) for p in modules
                 if p != REPO / "src" / "cxr" / "core" / "model_dir.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    # the check sees what it forbids
    assert len(_raw_card_access('c = json.loads((d / "model_card.json").read_text())\nnew_card["ood"]\n'
                                'card.get("x")\ncard.data.get("explain")\n')) == 4
    assert _raw_card_access('card.threshold\nraise CxrError("no model_card.json here")\n') == []


def test_the_shipped_markdown_card_is_what_the_typed_card_renders() -> None:
    from cxr.core.claims import CLAIMS_FILE, Claims
    from cxr.export.card import card_markdown

    for folder in model_dirs(SHIPPED_REPOSITORY):
        card = folder.card()
        claims = Claims.load(folder.path / CLAIMS_FILE)
        assert claims.model_sha256 == card.sha256
        assert card_markdown(card, claims) == (folder.path / "MODEL_CARD.md").read_text()
