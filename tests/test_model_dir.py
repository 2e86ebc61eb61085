"""The typed model folder: the card, the served parameters and the provenance read and written in one place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cxr.core.errors import CxrError, ModelIntegrityError
from cxr.core.model_dir import ModelCard, ModelDir, ServedParams, model_dirs
from cxr.export import repository
from tests.conftest import SHIPPED_REPOSITORY


def test_the_shipped_folders_read_typed() -> None:
    names = [d.name for d in model_dirs(SHIPPED_REPOSITORY)]
    assert names == ["pneumonia", "pneumonia_int8"]
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
    with pytest.raises(CxrError):
        folder.write_card({"sha256": "short", "calibration": {"threshold": 0.3}})
    assert not folder.has_card()
    folder.write_card({"sha256": "ab" * 32, "calibration": {"threshold": 0.3}}, "# card\n")
    assert folder.card().threshold == 0.3 and (tmp_path / "MODEL_CARD.md").read_text() == "# card\n"
