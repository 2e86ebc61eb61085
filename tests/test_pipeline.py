"""Integration: train a tiny model for one epoch, calibrate, evaluate, export to ONNX, parity (real TF, tf2onnx, ORT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.core import contract
from cxr.core.errors import CxrError
from tests.conftest import cxr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, train_data: Path, site_data: Path) -> Path:
    run = tmp_path_factory.mktemp("run")
    cxr("train", "--data", str(train_data), "--out", str(run), "--epochs", "1", "--limit-per-class", "40",
        "--batch-size", "16", "--val-fraction", "0.25", "--monitor", str(site_data),
        "--cache-dir", str(tmp_path_factory.mktemp("cache")), ok=True)
    return run


def test_training_writes_the_run_directory(tiny_run: Path) -> None:
    for name in ("model.keras", "split.json", "history.json", "history.csv", "train_config.json", "accuracy.png", "loss.png"):
        assert (tiny_run / name).exists(), name
    hist = json.loads((tiny_run / "history.json").read_text())
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "val_auc", "monitor_auc"} <= set(hist["history"])
    assert hist["best_epoch"] == 1 and set(hist["sampling_mass"]) == {"kaggle/NORMAL", "kaggle/PNEUMONIA"}
    assert sum(hist["sampling_mass"].values()) == pytest.approx(1.0)


def test_calibrate_evaluate_export_parity(tiny_run: Path, train_data: Path, site_data: Path, tmp_path: Path) -> None:
    # A one-epoch model has near-constant logits; Platt scaling would blow them up, so no scaling here.
    if len(list((site_data / "PNEUMONIA").glob("*"))) < 60:
        # 16 generated positives cannot show sensitivity >= 0.95 at 90% confidence: the default rule says so
        r = cxr("calibrate", "--model", str(tiny_run / "model.keras"), "--data", str(site_data), "--scaling", "none",
                timeout=600)
        assert r.returncode == 2 and "cannot show sensitivity >= 0.95 at 90% confidence" in r.stderr, r.stderr[-2000:]
        rule = "sensitivity"
    else:
        rule = "sensitivity_lcb"
    cxr("calibrate", "--model", str(tiny_run / "model.keras"), "--data", str(site_data), "--scaling", "none",
        "--rule", rule, ok=True)
    cal = json.loads((tiny_run / "calibration.json").read_text())
    assert cal["rule"] == rule and 0 < cal["threshold"] < 1 and cal["metrics"]["sensitivity"] >= 0.95
    if rule == "sensitivity_lcb":
        assert cal["metrics"]["sensitivity_lower_bound"] >= 0.95 and cal["confidence"] == 0.9

    cxr("evaluate", "--model", str(tiny_run / "model.keras"), "--data", str(site_data), "--n-boot", "100",
        "--out", str(tiny_run / "eval_site"), ok=True)
    rep = json.loads((tiny_run / "eval_site" / "report.json").read_text())
    for key in ("accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc", "ece", "brier", "accuracy_at_0.5"):
        lo, hi = rep["metrics"][key]["ci95"]
        assert lo <= rep["metrics"][key]["value"] + 1e-9 and rep["metrics"][key]["value"] <= hi + 1e-9
    for png in ("roc.png", "pr.png", "reliability.png", "confusion.png"):
        assert (tiny_run / "eval_site" / png).stat().st_size > 1000
    assert rep["threshold"] == pytest.approx(cal["threshold"])

    repo = tmp_path / "repo"
    # INT8 of a one-epoch model is judged by noise; its own test below covers quantization and the gate.
    r = cxr("export", "--model", str(tiny_run / "model.keras"), "--data", str(train_data), "--repository", str(repo),
            "--no-int8", ok=True)
    assert "fp32" in r.stdout
    card = json.loads((repo / "pneumonia" / "model_card.json").read_text())
    par = card["export"]["parity"]["fp32"]["parity"]
    assert par["max_abs_diff"] <= 1e-5 and par["label_agreement"] == 1.0 and par["n_images"] >= 16
    assert card["calibration"]["threshold"] == pytest.approx(cal["threshold"])
    assert "site" in card["evaluations"]
    assert card["commands"][0].startswith("cxr train") and card["commands"][-1].startswith("cxr export")

    import onnx
    import onnxruntime as ort

    m = onnx.load(str(repo / "pneumonia" / "1" / "model.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(str(repo / "pneumonia" / "1" / "model.onnx"))
    (inp,), (out, ood) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape) == (contract.INPUT_NAME, "tensor(uint8)", [contract.BATCH_DIM, 224, 224, 1])
    assert (out.name, out.shape) == (contract.OUTPUT_NAME, [contract.BATCH_DIM, 1])
    assert (ood.name, ood.shape) == (contract.OOD_OUTPUT_NAME, [contract.BATCH_DIM, 1])
    assert card["ood"]["threshold"] > 0 and card["ood"]["parity_max_rel_diff"] <= 1e-4  # both outputs checked
    assert (repo / "pneumonia" / "configs" / "cpu.pbtxt").exists() and (repo / "pneumonia" / "1" / "model.py").exists()
    assert (repo / "pneumonia" / "eligibility.json").exists() and not (repo / "pneumonia" / "labels.txt").exists()
    from cxr.client import PneumoniaClient

    with PneumoniaClient(str(repo), protocol="embedded") as c:  # the exported folder serves both outputs
        assert c.info.ood_threshold == pytest.approx(card["ood"]["threshold"], rel=1e-7)
        scores = c.infer_scores(np.zeros((2, 224, 224, 1), np.uint8))
        assert scores.ood_score is not None and scores.ood_score.shape == (2,)


def test_int8_quantization_and_gate(tiny_run: Path, tmp_path: Path) -> None:
    import onnx

    from cxr.export.onnx_export import check_parity, int8_gate, quantize_int8, to_onnx
    from cxr.train.scoring import Calibration, OnnxScorer

    fp32 = to_onnx(tiny_run / "model.keras", tmp_path / "fp32.onnx", Calibration())
    x = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 1), dtype=np.uint8)
    int8 = quantize_int8(fp32, tmp_path / "int8" / "model.onnx", x)
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    rep = check_parity(OnnxScorer(fp32)(x), int8, x, threshold=0.5, tolerance=None)
    assert rep.ok and rep.n_images == 32 and rep.max_abs_diff < 0.2
    assert int8_gate(0.95, 0.946) == [] and int8_gate(0.95, 0.94)  # 0.004 passes, 0.010 is refused


def test_parity_failures_are_collected_into_one_typed_error(tiny_run: Path, tmp_path: Path) -> None:
    from cxr.export.onnx_export import check_parity, to_onnx
    from cxr.train.scoring import Calibration

    onnx_path = to_onnx(tiny_run / "model.keras", tmp_path / "m.onnx", Calibration())
    x = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 1), dtype=np.uint8)
    wrong_reference = np.r_[np.zeros(4), np.ones(4)]  # certainly far from the model's outputs
    rep = check_parity(wrong_reference, onnx_path, x, threshold=0.5)
    assert not rep.ok  # every failed check is collected, not only the first
    assert any("max |dp|" in f for f in rep.failures) and any("labels differ" in f for f in rep.failures)


def test_inception_v3_builds_with_the_contract() -> None:
    from cxr.train import models

    m = models.build("inception_v3")
    assert m.input_shape == (None, 224, 224, 1) and m.output_shape == (None, 1)
    assert m.get_layer("dense").units == 128
    with pytest.raises(CxrError, match="weights file not found"):
        models.build("inception_v3", weights="/nonexistent.h5")




def test_compare_scores_each_model_like_evaluate(tiny_run: Path, site_data: Path, tmp_path: Path) -> None:
    from cxr.core.paths import DEFAULT_REPOSITORY
    from cxr.train.evaluate import evaluate

    out = tmp_path / "cmp"
    r = cxr("compare", "--data", str(site_data), "--out", str(out), "--n-boot", "50",
            "--model", f"tiny={tiny_run / 'model.keras'}", "--model", f"shipped={DEFAULT_REPOSITORY / 'pneumonia'}",
            "--quoted", "a report=80.9%=its own test split", "--note", "tiny is a one-epoch smoke run", ok=True)
    result = json.loads((out / "comparison.json").read_text())
    assert [row["name"] for row in result["measured"]] == ["tiny", "shipped"]
    assert result["quoted"] == [{"label": "a report", "accuracy": pytest.approx(0.809), "source": "its own test split"}]
    tiny, shipped = result["measured"]
    # the same numbers `cxr evaluate` gives for each model on the same images
    for row, model in ((tiny, tiny_run / "model.keras"), (shipped, DEFAULT_REPOSITORY / "pneumonia" / "1" / "model.onnx")):
        ref = evaluate(model, site_data, tmp_path / f"eval_{row['name']}", n_boot=50)
        assert row["evaluation"]["threshold"] == pytest.approx(ref["threshold"])
        for key in ("roc_auc", "accuracy_at_0.5", "sensitivity", "specificity"):
            assert row["evaluation"]["metrics"][key]["value"] == pytest.approx(ref["metrics"][key]["value"]), key
    assert tiny["trained"]["architecture"] == "compact" and tiny["trained"]["epochs_run"] == 1
    card = json.loads((DEFAULT_REPOSITORY / "pneumonia" / "model_card.json").read_text())
    assert shipped["trained"]["seconds"] > 0 and shipped["trained"]["threshold_rule"] == card["calibration"]["rule"]
    assert shipped["trained"]["threshold_rule"].startswith(f"operating point {card['default_operating_point']}")
    md = (out / "comparison.md").read_text()
    assert "a report: **quoted, not measured**" in md and "0.809 (quoted)" in md and "| tiny (" in md
    assert "- tiny is a one-epoch smoke run" in md
    assert (out / "comparison_roc.png").stat().st_size > 0 and "quoted, not measured" in r.stdout


def test_compare_refuses_bad_entries(tmp_path: Path, site_data: Path) -> None:
    r = cxr("compare", "--data", str(site_data), "--out", str(tmp_path), "--model", f"x={tmp_path}", timeout=120)
    assert r.returncode == 2 and "model_card.json" in r.stderr.strip().splitlines()[-1]
    from cxr.train.compare import parse_quoted

    assert parse_quoted("r=0.809").accuracy == pytest.approx(0.809)
    for bad in ("r", "r=abc", "r=180%"):
        with pytest.raises((CxrError, ValueError)):
            parse_quoted(bad)


def test_calibrate_on_too_small_a_sample_is_one_line_error(tiny_run: Path, site_data: Path, tmp_path: Path) -> None:
    import shutil

    small = tmp_path / "small"
    for cls in ("NORMAL", "PNEUMONIA"):
        (small / cls).mkdir(parents=True)
        for f in sorted((site_data / cls).iterdir())[:10]:
            shutil.copy(f, small / cls / f.name)
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    r = cxr("calibrate", "--model", str(tiny_run / "model.keras"), "--data", str(small), "--scaling", "none",
            timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cxr calibrate: error: 10 positives cannot show sensitivity >= 0.95 at 90% confidence"), last
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()} == before  # nothing written, not even
    # the command log (commands.txt lists what built the model)
