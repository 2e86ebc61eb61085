"""cxr's state in one documented place: $CXR_HOME, else the user's state and cache folders; no command's default
writes into the working directory, the checkout or the package; a listener started on an empty spool says where
an earlier spool still holds unfinished work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.core import paths
from tests.conftest import REPO, SHIPPED_REPOSITORY, cxr, wait_until


def test_the_state_folder_is_cxr_home_else_the_users_state_folder(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    assert paths.state_dir() == tmp_path / "home" and paths.cache_dir() == tmp_path / "home" / "cache"
    monkeypatch.delenv("CXR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.state_dir() == tmp_path / ".local" / "state" / "cxr"
    assert paths.cache_dir() == tmp_path / ".cache" / "cxr"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    assert paths.state_dir() == tmp_path / "s" / "cxr" and paths.cache_dir() == tmp_path / ".cache" / "cxr"


def test_no_default_writes_into_the_working_directory_or_the_checkout() -> None:
    """Every Path default of every command lies in the state or cache folder, or is the shipped model (read)."""
    from cxr.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    allowed = (paths.STATE_DIR, paths.DEFAULT_CACHE, SHIPPED_REPOSITORY, paths.DEFAULT_REPOSITORY)
    bad = []
    for name, parser in sub.choices.items():
        actions = [a for a in parser._actions]
        for verbs in (a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"):
            actions += [a for p in verbs.choices.values() for a in p._actions]
        for a in actions:
            for d in (a.default if isinstance(a.default, (list, tuple)) else [a.default]):
                if isinstance(d, Path) and not any(Path(d).absolute().is_relative_to(root) for root in allowed):
                    bad.append(f"{name} --{a.dest}: {d}")
    assert not bad, bad
    assert not paths.STATE_DIR.is_relative_to(REPO / "src") and not paths.DEFAULT_CACHE.is_relative_to(REPO / "src")


def _spool_with_work(root: Path) -> Path:
    (root / "incoming").mkdir(parents=True)
    (root / "incoming" / "1.2.3.dcm").write_bytes(b"DICM")
    (root / "outbox").mkdir()
    (root / "outbox" / "1.2.4.sr.dcm").write_bytes(b"DICM")
    return root


def test_a_listener_on_an_empty_spool_names_the_spool_with_unfinished_work(tmp_path: Path) -> None:
    """The listener ran from one directory with --spool old (and was killed with work in it); started from another
    directory on an empty spool, it says, before listening, where the unfinished work is."""
    home = tmp_path / "home"
    old = _spool_with_work(tmp_path / "first" / "spool")
    home.mkdir()
    (home / "spools.txt").write_text(f"{old}\n")
    (tmp_path / "second").mkdir()
    busy = socket.socket()  # the listener then stops at once (a usage error: the port is taken)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        r = cxr("listen", "--port", str(busy.getsockname()[1]), "--url", str(SHIPPED_REPOSITORY), "--spool", "spool",
                timeout=300, cwd=tmp_path / "second", home=home)
    finally:
        busy.close()
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and str(old) in warnings[0] and "2 unfinished" in warnings[0], r.stderr[-2000:]
    assert f"--spool {old}" in warnings[0]
    assert str(tmp_path / "second" / "spool") in (home / "spools.txt").read_text()  # remembered for the next one


def test_no_warning_on_a_spool_that_holds_something_or_when_nothing_is_left(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr.cli import screen

    old = _spool_with_work(tmp_path / "old")
    monkeypatch.setattr(screen, "KNOWN_SPOOLS", tmp_path / "spools.txt")
    screen.remember_spool(old)
    screen.remember_spool(old)
    assert (tmp_path / "spools.txt").read_text() == f"{old}\n"
    assert len(screen.spool_warnings(tmp_path / "new")) == 1
    assert screen.spool_warnings(old) == []  # restarted on its own spool: nothing to say
    (old / "incoming" / "1.2.3.dcm").unlink()
    (old / "outbox" / "1.2.4.sr.dcm").unlink()
    assert screen.unfinished_work(old) == 0 and screen.spool_warnings(tmp_path / "new") == []


@pytest.mark.slow
def test_a_listener_killed_and_restarted_from_another_directory_finishes_its_spool(tmp_path: Path) -> None:
    """Started from one directory and from another with the same options (no --spool: the state folder's), the
    listener finds what the killed one accepted and did not screen, and screens every instance once."""
    import csv
    import signal
    import time

    import pydicom

    from cxr.serving.server import free_ports
    from tests.test_pacs import _store, chest_dx, echo

    home, results = tmp_path / "home", tmp_path / "results.csv"
    port = free_ports(1)[0]
    options = ["listen", "--port", str(port), "--allow", "MODALITY1", "--out", str(results),
               "--url", str(SHIPPED_REPOSITORY)]

    def start(cwd: Path) -> subprocess.Popen[bytes]:
        cwd.mkdir()
        log = cwd.parent / f"listen-{cwd.name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cxr.cli", *options], cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, "CXR_HOME": str(home)})
        wait_until(lambda: echo(port, calling="MODALITY1"), 240, "cxr listen to answer C-ECHO", proc=proc, log=log,
                   every_s=0.3)
        return proc

    first, second = (pydicom.dcmread(__import__("io").BytesIO(chest_dx(40 + i))) for i in range(2))
    listener = start(tmp_path / "a")
    try:
        assert _store(port, first, calling="MODALITY1") == [0]
        wait_until(lambda: results.exists() and len(results.read_text().splitlines()) == 2)
    finally:
        listener.send_signal(signal.SIGKILL)
        listener.wait()
    spool = home / "listen-spool"
    # what a listener killed between accepting and screening leaves: the instance, durably in incoming/
    (spool / "incoming" / f"{second.SOPInstanceUID}.dcm").write_bytes(chest_dx(41))
    listener = start(tmp_path / "b")
    try:
        wait_until(lambda: len(results.read_text().splitlines()) == 3)  # the left instance, screened
        assert _store(port, first, calling="MODALITY1") == [0]  # sent again: acknowledged, not screened again
        wait_until(lambda: not list((spool / "incoming").glob("*.dcm")))  # (no --send-to: results stay in the outbox)
        time.sleep(2)  # not a synchronisation: the time a wrong second screening would have to show its row
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    uids = [row["sop_instance_uid"] for row in csv.DictReader(results.open())]
    assert sorted(uids) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert not (tmp_path / "a" / "out").exists() and not (tmp_path / "b" / "out").exists()
