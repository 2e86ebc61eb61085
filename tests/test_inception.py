"""The report's recipe end to end: InceptionV3 with a local `notop` weights file, frozen base, one short epoch,
calibrate, export (parity), served by `cxr serve` next to the default model, `cxr predict --model` over gRPC, and
`cxr ui --model` in headless Chromium.

No weights can be downloaded here, so the test writes the weights file itself: an InceptionV3 `notop` base with
seeded random weights, saved in the legacy HDF5 layout of Keras's own
`inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr.core.paths import DEFAULT_REPOSITORY
from tests.conftest import cxr, wait_until

pytestmark = pytest.mark.slow

NAME = "pneumonia_inception"


def _base(weights: Path | None = None, seed: int = 0):  # type: ignore[no-untyped-def]
    import keras
    from keras.applications import InceptionV3

    keras.utils.set_random_seed(seed)
    base = InceptionV3(include_top=False, weights=None, input_shape=(224, 224, 3))
    if weights is not None:
        base.load_weights(str(weights))
    return base


@pytest.fixture(scope="module")
def notop_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path = tmp_path_factory.mktemp("weights") / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, _base(seed=7))
    return path


@pytest.fixture(scope="module")
def inception_run(tmp_path_factory: pytest.TempPathFactory, train_data: Path, notop_weights: Path) -> Path:
    run = tmp_path_factory.mktemp("inception_run")
    cxr("train", "--data", str(train_data), "--out", str(run), "--arch", "inception_v3", "--weights", str(notop_weights),
        "--epochs", "1", "--limit-per-class", "24", "--batch-size", "16", "--val-fraction", "0.25",
        "--cache-dir", str(tmp_path_factory.mktemp("cache")), ok=True, timeout=900)
    return run


def test_frozen_base_did_not_move(inception_run: Path, notop_weights: Path) -> None:
    import keras

    import cxr.train.models  # noqa: F401 - registers the custom layers for loading

    model = keras.models.load_model(inception_run / "model.keras", compile=False)
    (base,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert not base.trainable
    reference = _base(notop_weights, seed=99)  # a different seed: only the file can make them equal
    trained, loaded = base.get_weights(), reference.get_weights()
    assert len(trained) == len(loaded) == 376  # kernels, BN scales/offsets and BN moving statistics
    moved = [w.name for w, a, b in zip(base.weights, trained, loaded, strict=True) if not np.array_equal(a, b)]
    assert moved == [], f"frozen base weights moved: {moved[:5]}"
    head = list(model.trainable_weights)
    assert head and all("inception" not in w.path for w in head)  # only the head (Dense 128, Dense 1) trained
    hist = json.loads((inception_run / "history.json").read_text())
    assert hist["best_epoch"] == 1


def test_calibrate_export_serve_predict(inception_run: Path, train_data: Path, site_data: Path, tmp_path: Path,
                                        sample_images: list[Path]) -> None:
    from cxr.serving.server import free_ports

    # A one-epoch head has near-constant logits: no Platt scaling (as in test_pipeline). On generated data the
    # sample is too small for the Clopper-Pearson rule (test_pipeline checks that refusal), so the point rule.
    rule = "sensitivity_lcb" if len(list((site_data / "PNEUMONIA").glob("*"))) >= 60 else "sensitivity"
    cxr("calibrate", "--model", str(inception_run / "model.keras"), "--data", str(site_data), "--scaling", "none",
        "--rule", rule, ok=True, timeout=900)
    cal = json.loads((inception_run / "calibration.json").read_text())
    assert 0 < cal["threshold"] < 1 and cal["metrics"]["sensitivity"] >= 0.95

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(DEFAULT_REPOSITORY / "pneumonia", repo / "pneumonia")  # the default model, served beside it
    # INT8 skipped: a head trained for one epoch on random-weight features is judged by noise, and the gate's
    # accuracy comparison would say nothing; quantization and the gate are tested in test_pipeline.
    r = cxr("export", "--model", str(inception_run / "model.keras"), "--data", str(train_data), "--repository",
            str(repo), "--name", NAME, "--no-int8", timeout=1500, ok=True)
    assert "fp32" in r.stdout
    card = json.loads((repo / NAME / "model_card.json").read_text())
    parity = card["export"]["parity"]["fp32"]["parity"]
    assert parity["max_abs_diff"] <= 1e-5 and parity["label_agreement"] == 1.0
    assert card["calibration"]["threshold"] == pytest.approx(cal["threshold"])
    assert card["architecture"] == "inception_v3" and card["ood"]["parity_max_rel_diff"] <= 1e-4
    from cxr.export.onnx_export import MAX_MODEL_BYTES

    onnx_bytes = (repo / NAME / "1" / "model.onnx").stat().st_size
    assert card["bytes"] == onnx_bytes and MAX_MODEL_BYTES["compact"] < onnx_bytes <= MAX_MODEL_BYTES["inception_v3"]

    http, grpc, metrics = free_ports(3)
    server = subprocess.Popen(
        [sys.executable, "-m", "cxr.cli", "serve", "--model-repository", str(repo), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--timeout-s", "240"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        try:
            wait_until(lambda: client.is_model_ready(NAME) and client.is_model_ready("pneumonia"), 300,
                       "both models ready", proc=server, ignore=(Exception,), every_s=1.0)  # (an exception: not up yet)
        except AssertionError as e:
            if server.poll() is None:
                raise
            raise AssertionError(f"{e}\ncxr serve exited:\n{server.stdout.read() if server.stdout else ''}") from None

        answers = {}
        for model in (NAME, "pneumonia"):
            out = tmp_path / f"{model}.csv"
            cxr("predict", *map(str, sample_images[:6]), "--url", f"127.0.0.1:{grpc}", "--protocol", "grpc",
                "--model", model, "--format", "csv", "--out", str(out), ok=True, timeout=900)
            rows = list(csv.DictReader(out.open()))
            assert len(rows) == 6 and {row["model_name"] for row in rows} == {model}
            answers[model] = rows
        inc = answers[NAME]
        assert all(row["status"] in ("ok", "not_assessable") for row in inc)
        assert all(float(row["threshold"]) == pytest.approx(cal["threshold"], abs=1e-6) for row in inc)
        # Served answers equal the exported ONNX run locally (the same contract preprocessing on both sides).
        from cxr.core import imaging
        from cxr.train.scoring import OnnxScorer

        x = np.stack([imaging.preprocess(Path(row["path"])) for row in inc])
        local = OnnxScorer(repo / NAME / "1" / "model.onnx")(x)
        for row, p in zip(inc, local, strict=True):
            if row["status"] == "ok":
                assert float(row["probability"]) == pytest.approx(float(p), abs=1e-5)

        # The page picks the model by name too: its answer is the InceptionV3's, as `cxr predict --model` gave it.
        from cxr.core.contract import format_probability
        from cxr.ui import BADGES
        from tests.test_ui import chromium_page, running_ui, submit_files

        row = inc[0]
        ui_args = ["--url", f"127.0.0.1:{grpc}", "--model", NAME, "--model-repository", str(repo)]
        with running_ui(ui_args, tmp_path / "ui.log") as url, chromium_page(url) as page:
            text = submit_files(page, [Path(row["path"])]).inner_text()
            name = Path(row["path"]).name
            if row["status"] == "ok":
                expected = f"{BADGES[row['label']]} ({name}): P(pneumonia) {format_probability(float(row['probability']))}"
                assert expected in text and f"model {NAME} v1" in text, text
            else:
                assert f"({name}): Not assessable:" in text, text
            footer = page.inner_text("body")
            assert f"Model {NAME} v1 via grpc" in footer and "heatmap unavailable" not in footer, footer
            if row["label"] == "Pneumonia":  # Grad-CAM works on the InceptionV3 graph too (mixed10)
                page.locator("#gradcam img").first.wait_for(timeout=60_000)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
