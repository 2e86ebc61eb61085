"""The readiness helper the tests wait on servers with: it returns at the line, at the process's end, or at the
deadline, whichever comes first (a server that never says it is ready cannot hang a test)."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import read_line, wait_for_line


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_line_is_returned_whole_once_printed() -> None:
    proc = _child("import sys, time\nprint('starting', flush=True)\nsys.stdout.write('listen')\nsys.stdout.flush()\n"
                  "time.sleep(0.3)\nprint('ing 4321', flush=True)\ntime.sleep(60)")
    try:
        assert read_line(proc, "listening ", deadline_s=30) == "listening 4321"  # split across writes, whole
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_silent_process_cannot_hold_the_caller_past_the_deadline() -> None:
    proc = _child("import time\ntime.sleep(60)")
    try:
        t0 = time.monotonic()
        assert read_line(proc, "listening ", deadline_s=1.0) is None
        assert not wait_for_line(proc, "ready", deadline_s=0.5)
        assert time.monotonic() - t0 < 10  # the deadlines, not the process's 60 s
        assert proc.poll() is None  # it was the deadline that ended the wait
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_process_that_ends_without_the_line_ends_the_wait() -> None:
    proc = _child("print('error: no port', flush=True)")
    assert read_line(proc, "listening ", deadline_s=60) is None
    proc.wait(timeout=30)
    last = _child("import sys\nsys.stdout.write('listening 7')")  # an unterminated last line still counts
    assert read_line(last, "listening ", deadline_s=60) == "listening 7"
    last.wait(timeout=30)
