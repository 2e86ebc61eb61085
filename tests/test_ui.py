"""The Gradio page in a real headless browser (Debian's Chromium driven by Playwright) against the real Triton."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cxr.serving.server import free_port
from tests.conftest import REPO, cxr, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
SCREENSHOTS = REPO / "out" / "ui"


@contextlib.contextmanager
def running_ui(args: list[str], log_path: Path) -> Iterator[str]:
    """``cxr ui ARGS`` on a free loopback port, polled against a deadline, always stopped; yields its URL."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's 'chromium' package (scripts/test.sh does)")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cxr.cli", "ui", *args, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"

            def answers() -> bool:
                with urllib.request.urlopen(url, timeout=2):
                    return True

            wait_until(answers, 120, "cxr ui to answer", proc=proc, log=log_path, ignore=(OSError,))
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def chromium_page(url: str) -> Iterator[Any]:
    """A headless Chromium page (Playwright) opened at ``url``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 1400})
            pg.goto(url)
            yield pg
        finally:
            browser.close()


def submit_files(page: Any, paths: list[Path]) -> Any:
    """Upload ``paths``, press Submit and wait for the first answer; returns the result locator."""
    page.get_by_text("Drop a chest X-ray image here").wait_for(timeout=60_000)
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in paths])
    page.locator("#upload").get_by_text(paths[-1].stem).wait_for(timeout=30_000)  # upload finished
    page.locator("#submit").click()
    result = page.locator("#result")
    result.locator(".cxr-answer").first.wait_for(timeout=60_000)
    return result


@pytest.fixture(scope="module")
def ui_url(triton_server, tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with running_ui(["--url", triton_server.config.grpc_url], tmp_path_factory.mktemp("ui") / "ui.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(ui_url):  # type: ignore[no-untyped-def]
    with chromium_page(ui_url) as pg:
        yield pg


def _cli_answer(path: Path, triton_server) -> dict:  # type: ignore[no-untyped-def]
    import json

    r = cxr("predict", str(path), "--url", triton_server.config.grpc_url, "--format", "json", timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def test_upload_submit_matches_cli_then_clear_then_non_image(page, triton_server, sample_images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.get_by_text("Drop a chest X-ray image here").wait_for(timeout=60_000)
    assert page.get_by_role("heading", name="Pneumonia Detection using Chest X-Ray").is_visible()
    assert page.title() == "Pneumonia Detection using Chest X-Ray"

    image = REPO / "examples" / "PNEUMONIA" / "person1003_virus_1685.jpeg"  # a real film, with or without ../shared
    result = submit_files(page, [image])
    text = result.inner_text()
    cli = _cli_answer(image, triton_server)
    from cxr.core.contract import format_probability
    from cxr.ui import BADGES

    assert cli["status"] == "ok" and cli["label"] == "Pneumonia", cli
    assert f"{BADGES[cli['label']]} ({image.name}): P(pneumonia) {format_probability(cli['probability'])}" in text, text
    assert "probability" not in text.replace("P(pneumonia)", "")
    img = page.locator("#gradcam img").first  # positive evidence, for Pneumonia answers
    img.wait_for(timeout=30_000)
    w, h = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    from PIL import Image

    ow, oh = Image.open(image).size
    assert abs(w / h - ow / oh) < 0.02, (w, h, ow, oh)  # the whole film, aspect ratio kept ...
    bw, bh = img.evaluate("i => [i.getBoundingClientRect().width, i.getBoundingClientRect().height]")
    assert abs(bw / bh - ow / oh) < 0.02, (bw, bh)  # ... and shown whole, not cropped
    page.screenshot(path=str(SCREENSHOTS / "ui_result.png"), full_page=True)

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelector('#result').innerText.trim() === ''", timeout=30_000)

    bad = tmp_path / "report.txt"
    bad.write_text("this is a radiology report, not an image")
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    page.locator("#upload").get_by_text(bad.stem).wait_for(timeout=30_000)
    page.locator("#submit").click()
    result.get_by_text("not an image").wait_for(timeout=60_000)
    assert "report.txt" in result.inner_text() and result.locator(".cxr-error").count() == 1
    page.screenshot(path=str(SCREENSHOTS / "ui_non_image.png"), full_page=True)


def test_blank_image_is_not_assessable_without_heatmap(page, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelector('#result').innerText.trim() === ''", timeout=30_000)
    blank = tmp_path / "blank.png"
    Image.new("L", (600, 500), 255).save(blank)
    submit_files(page, [blank])
    answer = page.locator("#result .cxr-not-assessable")
    answer.wait_for(timeout=60_000)
    text = answer.inner_text()
    assert "NOT ASSESSABLE" in text and "blank_image" in text and "Pneumonia" not in text
    assert page.locator("#gradcam img").count() == 0
    page.screenshot(path=str(SCREENSHOTS / "ui_not_assessable.png"), full_page=True)


def test_several_images_give_a_table_and_csv(page, sample_images) -> None:  # type: ignore[no-untyped-def]
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelector('#result').innerText.trim() === ''", timeout=30_000)
    page.locator("#upload").get_by_text("Drop File Here").wait_for(timeout=30_000)
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in sample_images[:3]])
    page.locator("#upload").get_by_text(sample_images[2].stem).wait_for(timeout=30_000)  # upload finished (stem and suffix are shown apart)
    page.locator("#submit").click()
    page.locator("#table").get_by_text(sample_images[2].name, exact=True).wait_for(timeout=60_000)
    page.screenshot(path=str(SCREENSHOTS / "ui_table.png"), full_page=True)
    table = page.locator("#table").inner_text()
    for p in sample_images[:3]:
        assert p.name in table
    link = page.locator("#csv a").first
    link.wait_for(timeout=30_000)
    assert (link.get_attribute("href") or "").endswith(".csv")


def test_login_refuses_a_wrong_password_in_chromium(triton_server, page, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`cxr ui --auth-file`: Gradio's login in front of the page, credentials from a scrypt file (cxr ui-passwd)."""
    creds = tmp_path / "users"
    r = cxr("ui-passwd", str(creds), "reader", input="correct horse battery\n", timeout=60)
    assert r.returncode == 0, r.stderr
    assert oct(creds.stat().st_mode & 0o777) == "0o600" and "correct horse" not in creds.read_text()
    with running_ui(["--url", triton_server.config.grpc_url, "--auth-file", str(creds)], tmp_path / "ui.log") as url:
        login = page.context.browser.new_context().new_page()  # the module's browser, a fresh context (no cookies)
        login.goto(url)
        login.get_by_label("username").fill("reader")
        login.get_by_label("password").fill("wrong password")
        login.get_by_role("button", name="Login").click()
        login.get_by_text("Incorrect Credentials", exact=False).wait_for(timeout=30_000)
        assert login.get_by_role("heading", name="Pneumonia Detection using Chest X-Ray").count() == 0
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        login.screenshot(path=str(SCREENSHOTS / "ui_login_refused.png"))
        login.goto(url)  # a fresh login form
        login.get_by_label("username").fill("reader")
        login.get_by_label("password").fill("correct horse battery")
        login.get_by_role("button", name="Login").click()
        login.get_by_role("heading", name="Pneumonia Detection using Chest X-Ray").wait_for(timeout=60_000)
        login.context.close()
