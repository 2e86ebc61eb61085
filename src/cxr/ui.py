"""``cxr ui``: the report's Gradio page, done right.

Predictions go through the project's client (the running Triton over gRPC by
default, ``--protocol embedded`` in-process), so the page never disagrees with
``cxr predict``: each file is *Normal*, *Pneumonia*, *Not assessable* (with the
rule that refused it) or an *Error*. The Grad-CAM heatmap is drawn only for a
Pneumonia answer, over the whole film, and only when the local model file is
the one the server serves (same sha256); otherwise the page says it is
unavailable and why (see :mod:`cxr.client.explain`).

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
from dataclasses import dataclass, field
from pathlib import Path

from cxr.core import imaging
from cxr.core.errors import CxrError

logger = logging.getLogger(__name__)

TITLE = "Pneumonia Detection using Chest X-Ray"
USAGE = (
    "Drop a chest X-ray image here or click to upload (JPEG, PNG or DICOM; several at once give a table), "
    "then press **Submit**. **Clear** resets the page. The answer is *Normal* or *Pneumonia* with P(pneumonia), "
    "the decision threshold in use and the model version, or *Not assessable* with the reason when the image is "
    "not one the model can judge (not a frontal chest X-ray, blank, colour, unusual): have a person read those. "
    "For a Pneumonia answer, the heatmap (Grad-CAM) marks the regions that raised P(pneumonia). "
    "A screening aid, not a diagnosis."
)
COLUMNS = ["file", "status", "label", "P(pneumonia)", "threshold", "operating_point", "model_version", "reason"]
#: Labels get a symbol and a word, not colour alone.
BADGES = {"Pneumonia": "▲ PNEUMONIA", "Normal": "● NORMAL", "not_assessable": "◆ NOT ASSESSABLE", "error": "✖ ERROR"}
CSS = """
.cxr-answer { padding: 0.5em 0.8em; margin: 0.4em 0; border-left: 6px solid; border-radius: 4px; }
.cxr-pneumonia { border-color: #b91c1c; background: #fef2f2; }
.cxr-normal { border-color: #15803d; background: #f0fdf4; }
.cxr-not-assessable { border-color: #6b7280; background: #f3f4f6; border-left-style: dashed; }
.cxr-error { border-color: #92400e; background: #fffbeb; border-left-style: dotted; }
.cxr-cam { margin: 0.5em 0; max-width: 900px; }
"""


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
        auth_file: Credentials file (``user:scrypt$...`` lines, made by ``cxr ui-passwd``): the page asks for a
            login. Required on any address but loopback.
        https_cert: Certificate for HTTPS (required, with ``https_key``, on any address but loopback).
        https_key: Its private key.
        tls: TLS settings for reaching Triton (:class:`cxr.core.security.TlsClient`).
        config_key: Key for a server that restricts model-config.
        audit_log: Append each upload and answer (the signed-in user, the file's sha256, never its name) to this
            hash-chained audit trail.
    """

    url: str | None = None
    protocol: str = "grpc"
    model: str = "pneumonia"
    repository: Path = Path("model_repository")
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    max_file_mb: int = 32
    auth_file: Path | None = None
    https_cert: Path | None = None
    https_key: Path | None = None
    tls: object | None = None
    config_key: str | None = field(default=None, repr=False)
    audit_log: Path | None = None
    operating_point: str | None = None

    def __post_init__(self) -> None:
        from cxr.core.security import is_loopback

        if self.max_file_mb < 1:
            raise ValueError("max_file_mb must be >= 1")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if (self.https_cert is None) != (self.https_key is None):
            raise ValueError("give --https-cert and --https-key together")
        if not is_loopback(self.host) and (self.auth_file is None or self.https_cert is None):
            raise ValueError(f"refusing to serve the page on {self.host} without a login and HTTPS: give --auth-file "
                             "(make it with `cxr ui-passwd`) and --https-cert/--https-key, or bind 127.0.0.1 behind "
                             "an authenticating proxy")
        if self.share and self.auth_file is None:
            raise ValueError("a public share link needs --auth-file")
        if self.auth_file is not None:
            load_credentials(self.auth_file)  # fail early on a bad file


_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def _scrypt(password: str, salt: bytes) -> str:
    import hashlib

    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def hash_password(password: str) -> str:
    """``scrypt$<salt hex>$<hash hex>`` for a credentials file (passwords of at least 8 characters)."""
    import secrets

    if len(password) < 8:
        raise ValueError("passwords must have at least 8 characters")
    return _scrypt(password, secrets.token_bytes(16))


def load_credentials(path: Path) -> dict[str, str]:
    """``user -> scrypt$...`` from a credentials file (``user:scrypt$salt$hash`` per line; ``#`` comments).

    Raises:
        CxrError: Unreadable, readable by others, empty, or a malformed line (plain-text passwords are refused).
    """
    from cxr.core.security import read_private_text

    p = Path(path)
    lines = read_private_text(p, "credentials").splitlines()
    users: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, hashed = line.partition(":")
        if not user or not hashed.startswith("scrypt$") or hashed.count("$") != 2:
            raise CxrError(f"{p}:{n}: expected user:scrypt$salt$hash (make entries with `cxr ui-passwd`)")
        users[user] = hashed
    if not users:
        raise CxrError(f"credentials file {p} holds no user")
    return users


def check_password(users: dict[str, str], user: str, password: str) -> bool:
    """Constant-time check of one login against the credentials."""
    import hmac

    stored = users.get(user)
    if stored is None:
        _scrypt(password, b"\0" * 16)  # spend the same time for unknown users
        return False
    _, salt, _ = stored.split("$")
    try:
        candidate = _scrypt(password, bytes.fromhex(salt))
    except ValueError:
        return False
    return hmac.compare_digest(candidate, stored)


def set_password(path: Path, user: str, password: str) -> None:
    """Add ``user`` to the credentials file ``path``, or replace its entry: ``user:scrypt$salt$hash``, the file
    written durably with mode 600 (created when missing). The plain-text password never touches the disk.

    Raises:
        CxrError: A user name that is not 1-64 letters, digits, '.', '_' or '-', or a password under 8 characters.
    """
    import re

    from cxr.core.durable import write_durably

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", user):
        raise CxrError("user names are 1-64 letters, digits, '.', '_' or '-'")
    try:
        entry = f"{user}:{hash_password(password)}"
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    p = Path(path)
    lines = [ln for ln in (p.read_text().splitlines() if p.exists() else []) if not ln.startswith(f"{user}:")]
    write_durably(p, ("\n".join([*lines, entry]) + "\n").encode(), mode=0o600)


def _short(name: str) -> str:
    return Path(name).name


def _answer_html(name: str, pred, labels: tuple[str, ...]) -> str:
    import html

    from cxr.core.contract import Status, format_probability

    n = html.escape(name)
    if pred.status is Status.OK:
        cls = "cxr-pneumonia" if pred.label == labels[1] else "cxr-normal"
        return (f'<div class="cxr-answer {cls}"><b>{BADGES.get(pred.label, pred.label)}</b> ({n}): P(pneumonia) '
                f"{format_probability(pred.probability)}, threshold {pred.threshold:.3f} "
                f"(operating point {html.escape(pred.operating_point or '-')}), model {html.escape(pred.model_name)} "
                f"v{html.escape(pred.model_version)}</div>")
    if pred.status is Status.NOT_ASSESSABLE:
        r = pred.refusal
        return (f'<div class="cxr-answer cxr-not-assessable"><b>{BADGES["not_assessable"]}</b> ({n}): Not assessable: '
                f"{html.escape(r.description)} (<code>{r.rule}</code>: {html.escape(r.detail)}). "
                "Route to a human reader.</div>")
    reason = html.escape((pred.reason or "").replace(pred.source, name))  # the upload's temporary path, hidden
    return f'<div class="cxr-answer cxr-error"><b>{BADGES["error"]}</b> ({n}): {reason}</div>'


def _figure(rgb, caption: str) -> str:
    """An inline <figure> of the whole film (width scales, aspect ratio kept, never cropped)."""
    import base64
    import html
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=88)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure class="cxr-cam"><img alt="Grad-CAM of {html.escape(caption)}" src="data:image/jpeg;base64,{data}" '
            f'style="max-width:100%;height:auto;display:block"><figcaption>{html.escape(caption)}</figcaption></figure>')


def make_classifier(client, gradcam, workdir: Path, *, gradcam_note: str = "", audit=None) -> Callable:
    """The Submit handler: (HTML answers, Grad-CAM gallery, table rows, CSV path) for a list of uploaded files
    and the signed-in user (``None`` on a page without a login)."""
    from cxr.client.explain import film_for_display, overlay
    from cxr.core.contract import format_probability
    from cxr.core.integrity import sha256_file

    def classify(files: list | None, user: str | None = None):
        paths = [str(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            return "Please upload at least one image.", "", [], None
        notes: list[str] = []
        actor = f"user:{user}" if user else "user:(no login, loopback page)"
        shas = [sha256_file(Path(p)) for p in paths] if audit is not None else []
        for sha in shas:
            audit.event("received", actor=actor, instance_uid=f"sha256:{sha}", source="upload")
        try:
            preds = client.predict(paths)
            for pred, sha in zip(preds, shas):
                audit.event("screened", actor=actor, outcome="failure" if pred.status.value == "error" else "success",
                            instance_uid=pred.sop_instance_uid or f"sha256:{sha}", model_sha256=pred.model_sha256,
                            status=pred.status.value, rule=pred.rule, probability=pred.probability)
            cams = []
            for path, pred in zip(paths, preds):
                if not (pred.ok and pred.label == client.info.labels[1]):
                    continue  # positive evidence only, and only for a Pneumonia answer
                if gradcam is None:
                    notes.append(f"Heatmap unavailable: {gradcam_note}")
                    continue
                film = film_for_display(path)
                heat = gradcam.heatmap(imaging.preprocess(path), size=(film.shape[1], film.shape[0]))
                cams.append(_figure(overlay(film, heat), f"{_short(path)}: Pneumonia, P(pneumonia) "
                                                          f"{format_probability(pred.probability)}"))
                if getattr(gradcam, "check_note", ""):
                    notes.append(f"Heatmap: {gradcam.check_note}.")
        finally:
            for p in paths:  # uploads are not kept after the response
                try:
                    os.remove(p)
                except OSError:
                    pass
        rows, blocks = [], []
        for path, pred in zip(paths, preds):
            name = _short(path)
            reason = (f"{pred.rule}: {pred.refusal.detail}" if pred.refusal is not None
                      else (pred.reason or "").replace(path, name))
            rows.append([name, pred.status.value, pred.label or "",
                         "" if pred.probability is None else format_probability(pred.probability),
                         round(pred.threshold, 4), pred.operating_point, f"{pred.model_name} v{pred.model_version}",
                         reason])
            blocks.append(_answer_html(name, pred, client.info.labels))
        blocks += [f"<p><i>{n}</i></p>" for n in dict.fromkeys(notes)]
        csv_path = workdir / "results.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows(rows)
        return "\n".join(blocks), "\n".join(cams), rows, str(csv_path)

    return classify


def build_app(cfg: UiConfig):
    """Build the Gradio Blocks app (not launched)."""
    import gradio as gr

    from cxr.client import PneumoniaClient
    from cxr.client.explain import GradCam

    client = PneumoniaClient(cfg.url, protocol=cfg.protocol, model=cfg.model, tls=cfg.tls,  # type: ignore[arg-type]
                             config_key=cfg.config_key, operating_point=cfg.operating_point)
    note = ""
    try:
        gradcam = GradCam(Path(cfg.repository) / cfg.model, served_sha256=client.info.sha256)
    except CxrError as exc:
        note = str(exc)
        logger.warning("Grad-CAM unavailable: %s", exc)
        gradcam = None
    workdir = Path(tempfile.mkdtemp(prefix="cxr-ui-"))
    audit = None
    if cfg.audit_log is not None:
        from cxr.core.audit_trail import AuditLog, default_actor

        audit = AuditLog(cfg.audit_log, component="cxr ui")
        audit.event("started", actor=default_actor(), host=cfg.host, port=cfg.port)
        audit.event("model_changed", actor=default_actor(), model_sha256=client.info.sha256, model=client.info.name,
                    version=client.info.version)
    classify = make_classifier(client, gradcam, workdir, gradcam_note=note, audit=audit)

    def classify_as_user(files, request):
        return classify(files, getattr(request, "username", None))

    classify_as_user.__annotations__ = {"request": gr.Request}  # Gradio hands the request (and its login) in
    with gr.Blocks(title=TITLE, css=CSS) as app:
        gr.Markdown(f"# {TITLE}\n\n{USAGE}")
        files = gr.File(label="Chest X-ray image(s)", file_count="multiple", elem_id="upload")
        with gr.Row():
            clear = gr.Button("Clear", elem_id="clear")
            submit = gr.Button("Submit", variant="primary", elem_id="submit")
        result = gr.HTML(elem_id="result")
        gr.Markdown("**Grad-CAM** for Pneumonia answers: yellow to red marks the regions that raised P(pneumonia).")
        gallery = gr.HTML(elem_id="gradcam")
        table = gr.Dataframe(headers=COLUMNS, label="Results", elem_id="table", interactive=False)
        download = gr.File(label="Results CSV", elem_id="csv")
        point, threshold = client.point_for(None)
        gr.Markdown(f"Model `{client.info.name}` v{client.info.version} via {cfg.protocol}; operating point "
                    f"`{point}`, threshold {threshold:.3f} (from the served model; a DICOM upload whose header "
                    "states the patient's age is answered at its population's point unless the page was started with "
                    "--operating-point)"
                    + (f"; heatmap unavailable: {note}" if note else "") + ".")
        submit.click(classify_as_user, inputs=files, outputs=[result, gallery, table, download], api_name="classify")
        clear.click(lambda: (None, "", "", None, None), outputs=[files, result, gallery, table, download])
    def cleanup() -> None:
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if audit is not None:
            audit.event("stopped", actor=default_actor())
            audit.close()

    app.cxr_cleanup = cleanup
    return app


def launch(cfg: UiConfig) -> None:
    """Build and serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    tmp = tempfile.mkdtemp(prefix="cxr-ui-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = tmp
    app = build_app(cfg)
    auth = None
    if cfg.auth_file is not None:
        users = load_credentials(cfg.auth_file)
        auth = lambda user, password: check_password(users, user, password)  # noqa: E731
    try:
        app.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, max_file_size=f"{cfg.max_file_mb}mb",
                   show_error=True, auth=auth, auth_message="Sign in to the screening page.",
                   ssl_certfile=str(cfg.https_cert) if cfg.https_cert else None,
                   ssl_keyfile=str(cfg.https_key) if cfg.https_key else None)
    finally:
        app.cxr_cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

