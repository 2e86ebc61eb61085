"""``cxr listen`` that dies at one step of finishing an instance, as a SIGKILL would (``os._exit``: no cleanup, no
flush, no ``finally``): ``python tests/listen_crash.py STEP LISTEN-ARGS...``. The steps are :data:`STEPS`; the first
time the step is reached, the process exits with :data:`CRASHED`."""

from __future__ import annotations

import os
import sys

#: The exit status of the crash.
CRASHED = 70

#: Where the listener dies: the step just done (or, for ``before_*``, about to be done).
STEPS = ("screened", "row", "audit", "outbox", "done", "delivery", "delivered_marker")


def _die(*_a: object, **_k: object) -> None:
    sys.stderr.write("listen_crash: dying here\n")
    sys.stderr.flush()
    os._exit(CRASHED)


def arm(step: str) -> None:
    """Patch the listener's parts so that it dies at ``step``."""
    from cxr.doors.dicom import outbox, results, spool, telemetry

    def after(cls: type, name: str, when=lambda *a, **k: True) -> None:  # type: ignore[no-untyped-def]
        original = getattr(cls, name)

        def patched(*a, **k):  # type: ignore[no-untyped-def]
            out = original(*a, **k)
            if when(*a, **k):
                _die()
            return out

        setattr(cls, name, patched)

    def before(cls: type, name: str, static: bool = False) -> None:
        setattr(cls, name, staticmethod(_die) if static else _die)

    if step == "screened":  # the answer recorded, nothing made of it yet
        after(spool.Spool, "record_screened")
    elif step == "row":  # the CSV row written
        after(results.ResultBuilder, "row")
    elif step == "audit":  # the `screened` audit record written
        after(telemetry.Telemetry, "event_once", lambda self, event, *a, **k: event == "screened")
    elif step == "outbox":  # the results in the outbox, no done marker
        after(spool.Spool, "_to_outboxes", lambda self, results, **k: bool(results))
    elif step == "done":  # the done marker written, the incoming file still there
        before(spool.Spool, "_clear")
    elif step == "delivery":  # the PACS confirmed the SR (and the audit record is written), no delivered marker
        before(spool.Spool, "sent")
    elif step == "delivered_marker":  # the delivered marker written, the result still in the outbox
        before(spool.Spool, "_unqueue", static=True)
    else:
        raise SystemExit(f"unknown step {step!r} (one of {', '.join(STEPS)})")
    assert outbox  # the outbox calls the patched spool


if __name__ == "__main__":
    arm(sys.argv[1])
    from cxr.cli import main

    sys.exit(main(["listen", *sys.argv[2:]]))
