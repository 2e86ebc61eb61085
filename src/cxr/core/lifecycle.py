"""Run a service until SIGTERM or Ctrl-C: the one loop behind `cxr serve`, `cxr listen` and `cxr proxy`."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def serve_until_signal(alive: Callable[[], bool] | None = None, *, poll_s: float = 1.0) -> None:
    """Block until SIGTERM or Ctrl-C (SIGINT). With ``alive``, return as soon as it answers ``False`` (the
    service died), checked every ``poll_s`` seconds; the caller tells the two apart by calling ``alive`` again."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            if alive is not None and not alive():
                return
            stop.wait(poll_s if alive is not None else None)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
