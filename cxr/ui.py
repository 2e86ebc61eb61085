"""``cxr ui``: the report's Gradio page, done right.

Predictions go through the project's client (the running Triton over gRPC by
default, ``--protocol embedded`` in-process), so the page never disagrees with
``cxr predict``. The Grad-CAM heatmap comes from the served model's
``explain/`` companion (an ONNX of the last convolutional features plus the
head weights; see :mod:`cxr.explain`), not from a separate Keras model.

Safe defaults: binds 127.0.0.1, no public share link unless ``--share``, an
upload size limit, uploads deleted after each response.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxr import contract
from cxr.errors import CxrError

logger = logging.getLogger(__name__)

TITLE = "Pneumonia Detection using Chest X-Ray"
USAGE = (
    "Drop a chest X-ray image here or click to upload (JPEG, PNG or DICOM; several at once give a table), "
    "then press **Submit**. **Clear** resets the page. The answer is *Normal* or *Pneumonia*, with the "
    "probability, the decision threshold in use and the model version. The heatmap (Grad-CAM) shows which "
    "regions drove the answer. A screening aid, not a diagnosis."
)
COLUMNS = ["file", "label", "probability", "threshold", "model_version", "error"]


@dataclass(frozen=True)
class UiConfig:
    """How the page runs.

    Attributes:
        url: Triton address (or repository path for ``embedded``).
        protocol: ``grpc``, ``http`` or ``embedded``.
        model: Served model name.
        repository: Model repository holding ``<model>/explain`` for Grad-CAM.
        host: Bind address (loopback by default).
        port: Port.
        share: Create a public Gradio share link (off unless asked).
        max_file_mb: Upload size limit per file.
    """

    url: str | None = None
    protocol: str = "grpc"
    model: str = "pneumonia"
    repository: Path = Path("model_repository")
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    max_file_mb: int = 32

    def __post_init__(self) -> None:
        if self.max_file_mb < 1:
            raise ValueError("max_file_mb must be >= 1")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")


def _short(name: str) -> str:
    return Path(name).name


def make_classifier(client, gradcam, workdir: Path) -> Callable:  # type: ignore[no-untyped-def]
    """The Submit handler: (markdown, Grad-CAM gallery, table rows, CSV path) for a list of uploaded files."""
    from cxr.explain import overlay

    def classify(files: list | None):  # type: ignore[no-untyped-def]
        paths = [str(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            return "Please upload at least one image.", [], [], None
        try:
            preds = client.predict(paths)
            cams = []
            for path, pred in zip(paths, preds):
                if pred.ok and gradcam is not None:
                    img = contract.preprocess(path)  # decoded again only for the picture
                    cams.append((overlay(img, gradcam.heatmap(img)), f"{_short(path)}: {pred.label} {pred.probability:.3f}"))
        finally:
            for p in paths:  # uploads are not kept after the response
                try:
                    os.remove(p)
                except OSError:
                    pass
        rows, lines = [], []
        for path, pred in zip(paths, preds):
            name = _short(path)
            err = (pred.error or "").replace(path, name)
            rows.append([name, pred.label or "", "" if pred.probability is None else round(pred.probability, 4),
                         round(pred.threshold, 4), f"{pred.model_name} v{pred.model_version}", err])
            if pred.ok:
                lines.append(f"**{pred.label}** ({name}): probability {pred.probability:.3f}, threshold "
                             f"{pred.threshold:.3f}, model {pred.model_name} v{pred.model_version}")
            else:
                lines.append(f"**Error** ({name}): {err}")
        csv_path = workdir / "results.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows(rows)
        return "\n\n".join(lines), cams, rows, str(csv_path)

    return classify


def build_app(cfg: UiConfig):  # type: ignore[no-untyped-def]
    """Build the Gradio Blocks app (not launched)."""
    import gradio as gr

    from cxr.client import PneumoniaClient
    from cxr.explain import GradCam

    client = PneumoniaClient(cfg.url, protocol=cfg.protocol, model=cfg.model)
    try:
        gradcam = GradCam(Path(cfg.repository) / cfg.model)
    except CxrError as exc:
        logger.warning("Grad-CAM unavailable: %s", exc)
        gradcam = None
    workdir = Path(tempfile.mkdtemp(prefix="cxr-ui-"))
    classify = make_classifier(client, gradcam, workdir)
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\n\n{USAGE}")
        files = gr.File(label="Chest X-ray image(s)", file_count="multiple", elem_id="upload")
        with gr.Row():
            clear = gr.Button("Clear", elem_id="clear")
            submit = gr.Button("Submit", variant="primary", elem_id="submit")
        result = gr.Markdown(elem_id="result")
        gallery = gr.Gallery(label="Grad-CAM heatmap (red: regions that drove the answer)", elem_id="gradcam", columns=3,
                             height=420, object_fit="contain")
        table = gr.Dataframe(headers=COLUMNS, label="Results", elem_id="table", interactive=False)
        download = gr.File(label="Results CSV", elem_id="csv")
        gr.Markdown(f"Model `{client.info.name}` v{client.info.version} via {cfg.protocol}; threshold "
                    f"{client.info.threshold:.3f} (from the served model).")
        submit.click(classify, inputs=files, outputs=[result, gallery, table, download], api_name="classify")
        clear.click(lambda: (None, "", [], None, None), outputs=[files, result, gallery, table, download])
    def cleanup() -> None:
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)

    app.cxr_cleanup = cleanup
    return app


def launch(cfg: UiConfig) -> None:
    """Build and serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    tmp = tempfile.mkdtemp(prefix="cxr-ui-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = tmp
    app = build_app(cfg)
    try:
        app.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, max_file_size=f"{cfg.max_file_mb}mb",
                   show_error=True)
    finally:
        app.cxr_cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

