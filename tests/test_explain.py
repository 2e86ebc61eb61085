"""Grad-CAM on the served model: exact gradients, the sanity checks, and the served-model guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr.client.explain import (
    COMPACT_LAYERS,
    DEFAULT_LAYER,
    EFFICIENTNET_LAYERS,
    ExplanationUnavailable,
    GradCam,
    overlay,
)
from cxr.core import imaging
from cxr.core.integrity import sha256_file
from tests.conftest import REPO, SHIPPED_REPOSITORY

MODEL_DIR = SHIPPED_REPOSITORY / "pneumonia"
SHA = sha256_file(MODEL_DIR / "1" / "model.onnx")
ACCURATE_DIR = SHIPPED_REPOSITORY / "pneumonia_accurate"
ACCURATE_SHA = sha256_file(ACCURATE_DIR / "1" / "model.onnx")


@pytest.fixture(scope="module")
def films(sample_images: list[Path]) -> np.ndarray:
    return np.stack([imaging.preprocess(p, rules=False) for p in sample_images])


@pytest.fixture(scope="module", params=[*((MODEL_DIR, SHA, layer) for layer in COMPACT_LAYERS),
                                        *((ACCURATE_DIR, ACCURATE_SHA, layer) for layer in EFFICIENTNET_LAYERS)],
                ids=lambda p: f"{p[0].name}-{p[2]}")
def cam(request: pytest.FixtureRequest) -> GradCam:
    """Both shipped networks at every layer they are explained at (the EfficientNet's through ReLU6)."""
    folder, sha, layer = request.param
    return GradCam(folder, served_sha256=sha, layer=layer)


def test_numpy_tail_reproduces_the_graph_logit(cam: GradCam, films: np.ndarray) -> None:
    for f in films[:4]:
        a, z_graph = cam.activations(f)
        z_numpy, _ = cam.tail.forward(a)
        assert abs(z_numpy - z_graph) < 1e-4 * max(1.0, abs(z_graph))


def test_gradient_matches_finite_differences(cam: GradCam, films: np.ndarray) -> None:
    a, _ = cam.activations(films[0])
    _, cache = cam.tail.forward(a)
    grad = cam.tail.backward(cache)
    assert grad.shape == a.shape
    rng = np.random.default_rng(0)
    active = np.argwhere(np.abs(grad) > 1e-6)
    for idx in active[rng.choice(len(active), size=min(6, len(active)), replace=False)]:
        idx = tuple(idx)
        h = 1e-4 * max(1.0, abs(a[idx]))
        up, down = a.copy(), a.copy()
        up[idx] += h
        down[idx] -= h
        fd = (cam.tail.forward(up)[0] - cam.tail.forward(down)[0]) / (2 * h)
        if abs(fd - grad[idx]) > 1e-4 * max(1.0, abs(grad[idx])):  # a max-pool tie can split the gradient: check its half
            assert abs(2 * fd - grad[idx]) <= 1e-4 * max(1.0, abs(grad[idx])), (idx, fd, grad[idx])


def test_the_randomisation_verdict_travels_with_the_model() -> None:
    """Adebayo et al. (2018): an explanation that survives randomising the model explains little. `cxr explain-eval`
    measures it; the card carries the verdict for this file, and the page and the listener say when it failed."""
    cam = GradCam(MODEL_DIR, served_sha256=SHA)
    report = json.loads((REPO / "docs" / "model" / "gradcam.json").read_text())
    measured = report["layers"][cam.layer]["randomised_head_correlation"]
    assert cam.passes_check is (measured < 0.5) and report["passes_randomisation_check"] is (measured < 0.5)
    assert bool(cam.check_note) is (not cam.passes_check)
    rand = cam.with_random_head(seed=3)
    corr = [float(np.corrcoef(cam.cam(f).ravel(), rand.cam(f).ravel())[0, 1]) for f in _films_for(cam)
            if cam.cam(f).std() > 0 and rand.cam(f).std() > 0]
    assert corr and np.mean(corr) < 0.999, corr  # the randomised head changes the map at all


def test_a_verdict_of_another_file_is_not_this_files(tmp_path: Path) -> None:
    copy = tmp_path / "pneumonia"
    shutil.copytree(MODEL_DIR, copy)
    card = json.loads((copy / "model_card.json").read_text())
    card["explain"] = {**card["explain"], "sha256": "0" * 64, "passes_randomisation_check": False}
    (copy / "model_card.json").write_text(json.dumps(card))
    cam = GradCam(copy, served_sha256=SHA)
    assert cam.passes_check is None and cam.check_note == ""


def _films_for(cam: GradCam) -> list[np.ndarray]:
    """The real Pneumonia films of examples/ (two hospitals), with or without ../shared."""
    return [imaging.preprocess(p) for p in sorted((REPO / "examples" / "PNEUMONIA").iterdir())]


def test_peaks_differ_across_films_or_the_page_says_the_maps_failed_their_check() -> None:
    """A map that points at one place on every film explains nothing about the film. The shipped model's maps either
    peak in different places on the real films, or their file failed the randomisation check and every answer that
    shows one carries the note that says so (the distilled CPU model's maps: 2 peak cells on 4 films, and a failed
    check in docs/model/gradcam.md)."""
    cam = GradCam(MODEL_DIR, served_sha256=SHA)
    peaks = {np.unravel_index(int(cam.cam(f).argmax()), cam.cam(f).shape) for f in _films_for(cam)}
    assert len(peaks) >= 3 or (cam.passes_check is False and cam.check_note), (peaks, cam.passes_check)
    assert len(peaks) >= 2, peaks  # never one place for every film


def test_default_layer_is_the_measured_choice() -> None:
    report = json.loads((REPO / "docs" / "model" / "gradcam.json").read_text())
    assert DEFAULT_LAYER["compact_cnn"] == report["best_layer"] == GradCam(MODEL_DIR, served_sha256=SHA).layer
    assert report["sha256"] == SHA, "docs/model/gradcam.md is of another model: rerun `cxr explain-eval`"


def test_the_accurate_models_default_layer_is_its_measured_choice() -> None:
    report = json.loads((REPO / "docs" / "model" / "accurate" / "gradcam.json").read_text())
    assert report["sha256"] == ACCURATE_SHA, "docs/model/accurate/gradcam.md is of another model: rerun it"
    assert DEFAULT_LAYER["efficientnet_lite0"] == report["best_layer"] == GradCam(ACCURATE_DIR, served_sha256=ACCURATE_SHA).layer
    assert set(report["layers"]) == {*EFFICIENTNET_LAYERS, "random"}


def test_heatmap_keeps_the_film_size_and_aspect(films: np.ndarray) -> None:
    cam = GradCam(MODEL_DIR, served_sha256=SHA)
    heat = cam.heatmap(films[0], size=(900, 600))
    assert heat.shape == (600, 900) and heat.dtype == np.float32 and heat.min() >= 0 and heat.max() <= 1
    film = np.full((600, 900), 100, np.uint8)
    out = overlay(film, heat)
    assert out.shape == (600, 900, 3)
    cold = heat < 0.2
    if cold.any():  # below the floor the film is left as it was
        assert (out[cold] == 100).all()


def test_unavailable_when_the_local_file_is_not_the_served_model(tmp_path: Path) -> None:
    with pytest.raises(ExplanationUnavailable, match="not the served model"):
        GradCam(MODEL_DIR, served_sha256="0" * 64)
    with pytest.raises(ExplanationUnavailable, match="no model files"):
        GradCam(tmp_path / "nowhere", served_sha256=SHA)
    copy = tmp_path / "pneumonia"
    shutil.copytree(MODEL_DIR, copy)
    (copy / "1" / "model.onnx").write_bytes((copy / "1" / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ExplanationUnavailable):
        GradCam(copy, served_sha256=SHA)
