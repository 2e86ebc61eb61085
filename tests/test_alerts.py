"""The documented Prometheus alert rules fire: ``promtool check rules`` and ``promtool test rules`` (Debian's
``prometheus`` package ships promtool; scripts/test.sh installs it) on deploy/prometheus/cxr-alerts.yaml, and the
rules docs/hospital.md shows are the same as the file's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

RULES = REPO / "deploy" / "prometheus" / "cxr-alerts.yaml"
TESTS = REPO / "deploy" / "prometheus" / "cxr-alerts.test.yaml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: apt-get install prometheus (scripts/test.sh does)")
    return found


def _groups(text: str) -> dict[str, str]:
    """Each rule group's text by its name (the file's, or a documented ``groups:`` block's)."""
    body = text[text.index("groups:\n") + len("groups:\n"):]
    parts = re.split(r"^- name: ", body, flags=re.M)[1:]
    return {part.split("\n", 1)[0]: part.rstrip() for part in parts}


def test_the_rules_are_valid() -> None:
    r = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_fires_on_its_input_and_not_on_a_healthy_one() -> None:
    r = subprocess.run([_promtool(), "test", "rules", TESTS.name], capture_output=True, text=True, timeout=300,
                       cwd=TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    # every rule of the file has a test where it fires (expected alerts listed, not [])
    firing = set(re.findall(r"alertname: (\w+)\n +exp_alerts:\n +- ", TESTS.read_text()))
    alerts = set(re.findall(r"^  - alert: (\w+)", RULES.read_text(), flags=re.M))
    assert len(alerts) == 11 and alerts <= firing, sorted(alerts - firing)


def test_the_documented_rules_are_the_files() -> None:
    docs = (REPO / "docs" / "hospital.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", docs, flags=re.S) if b.startswith("groups:")]
    documented: dict[str, str] = {}
    for b in blocks:
        documented.update(_groups(b))
    assert documented == _groups(RULES.read_text())


def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    """The test cases can fail: the earlier CxrNothingScreened (series with different labels joined by `and`, so it
    never matched) fails them."""
    text = RULES.read_text()
    old = "    expr: increase(cxr_listen_received_total[1h]) > 0 and increase(cxr_screened_total[1h]) == 0\n"
    text = re.sub(r"(  - alert: CxrNothingScreened[^\n]*\n)    expr: \|\n(?:      [^\n]*\n)+", lambda m: m.group(1) + old,
                  text)
    assert old in text
    (tmp_path / RULES.name).write_text(text)
    (tmp_path / TESTS.name).write_text(TESTS.read_text())
    r = subprocess.run([_promtool(), "test", "rules", TESTS.name], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode != 0 and "CxrNothingScreened" in r.stdout + r.stderr


def test_the_metrics_address_is_an_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`cxr listen --metrics-host ADDRESS`: a Prometheus on another host can scrape the listener (served here on
    loopback only; the address chosen reaches the server as given)."""
    import urllib.request

    from cxr.cli import main
    from cxr.client.metrics import ScreeningMetrics
    from cxr.doors.dicom.config import ListenConfig
    from cxr.doors.dicom.telemetry import Telemetry

    t = Telemetry()
    port = t.serve_metrics(None, 0, "127.0.0.1")
    try:
        t.metric("received")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"cxr_listen_received_total 1.0" in r.read()
    finally:
        t.close()
    asked: list[tuple[int, str]] = []
    monkeypatch.setattr(ScreeningMetrics, "serve", lambda self, p, host="127.0.0.1": asked.append((p, host)) or 9)
    Telemetry().serve_metrics(None, 9108, "0.0.0.0")
    assert asked == [(9108, "0.0.0.0")]
    assert ListenConfig(spool=tmp_path, metrics_port=9108, metrics_host="0.0.0.0").metrics_host == "0.0.0.0"
    with pytest.raises(ValueError, match="--metrics-host"):
        ListenConfig(spool=tmp_path, metrics_port=9108, metrics_host=" ")
    with pytest.raises(SystemExit):
        main(["listen", "--help"])
    assert "--metrics-host ADDRESS" in capsys.readouterr().out
