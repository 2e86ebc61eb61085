"""The listener's durable state folder: every state of every instance and result is a file, so a restart finishes
whatever was in flight and never drops or duplicates a result (the layout: :mod:`cxr.doors.dicom`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cxr.core.durable import fsync_dir, write_durably

#: Files of the spool hold patient data (films, results): readable by their owner only; its folders likewise.
FILE_MODE = 0o600
DIR_MODE = 0o700


def _write(path: Path, data: bytes) -> None:
    write_durably(path, data, mode=FILE_MODE)


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


class Spool:
    """The durable state folder."""

    #: Outbox folder per destination kind.
    OUTBOXES = {"dimse": "outbox", "stow": "outbox-stow", "fhir": "outbox-fhir"}

    def __init__(self, root: Path, destinations: tuple[str, ...] = ("dimse",)) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.done = self.root / "done"
        self.screened = self.root / "screened"
        self.delivered = self.root / "delivered"
        self.outboxes = {k: self.root / self.OUTBOXES[k] for k in destinations}
        _mkdir(self.root)
        for d in (self.incoming, self.outbox, self.done, self.screened, self.delivered, *self.outboxes.values()):
            _mkdir(d)
        for stale in self.root.rglob(".*.tmp"):  # a crash mid-write: the sender was never told success
            stale.unlink(missing_ok=True)

    def is_done(self, uid: str) -> bool:
        return (self.done / uid).exists()

    # -- exactly once: what was screened, what was delivered -------------------------------------------------------
    def record_screened(self, uid: str, record: dict) -> None:
        """The answer of an instance, durably, before anything is made of it (``screened/<UID>.json``): a restart
        finishes from it rather than screening again (:meth:`screened_record`)."""
        _write(self.screened / f"{uid}.json", json.dumps(record).encode())

    def screened_record(self, uid: str) -> dict | None:
        """What :meth:`record_screened` kept for ``uid`` (``None``: not screened yet)."""
        try:
            return dict(json.loads((self.screened / f"{uid}.json").read_text()))
        except FileNotFoundError:
            return None
        except ValueError:  # cannot happen with durable writes; screen again rather than fail
            return None

    def _delivered_marker(self, kind: str, name: str) -> Path:
        return self.delivered / kind / name

    def was_delivered(self, kind: str, name: str) -> bool:
        """The destination ``kind`` confirmed the result ``name`` (a result's name is its identity: an SR's SOP
        Instance UID, derived from its key)."""
        return self._delivered_marker(kind, name).exists()

    def kind_of(self, f: Path) -> str:
        """The destination kind of an outbox file."""
        for kind, folder in self.outboxes.items():
            if f.parent == folder:
                return kind
        raise ValueError(f"{f} is in no outbox")

    def prune(self, retention_s: float, *, now: float | None = None) -> int:
        """Done and delivered markers older than ``retention_s`` removed (a copy of an instance that arrives after
        that is screened again); how many."""
        cutoff = (time.time() if now is None else now) - retention_s
        n = 0
        answered = [d / "report.json" for d in self.answered.iterdir()] if self.answered.is_dir() else []
        for report in answered:  # a study answered that long ago is not amended any more
            try:
                if report.stat().st_mtime < cutoff:
                    import shutil

                    shutil.rmtree(report.parent)
                    n += 1
            except FileNotFoundError:
                continue
        for folder in (self.done, *(d for d in self.delivered.iterdir() if d.is_dir())):
            for m in folder.iterdir():
                try:
                    if not m.name.startswith(".") and m.stat().st_mtime < cutoff:
                        m.unlink()
                        n += 1
                except FileNotFoundError:
                    continue
        return n

    def receive(self, uid: str, data: bytes, *, urgent: bool = False) -> bool:
        """Store an incoming instance durably (an urgent one's marker first); ``False`` when it was already
        screened (a duplicate)."""
        if self.is_done(uid):
            return False
        if urgent:
            _write(self.incoming / f"{uid}.urgent", b"")
        _write(self.incoming / f"{uid}.dcm", data)
        return True

    def is_urgent(self, path: Path) -> bool:
        return path.with_suffix(".urgent").exists()

    def pending(self) -> list[Path]:
        """Instances waiting, urgent ones first, each group in arrival order (one left behind by a crash after its
        done marker is cleared away, never screened again)."""
        files = []
        for p in self.incoming.glob("*.dcm"):
            if self.is_done(p.stem):
                self._clear(p.stem)
                continue
            try:
                files.append((not self.is_urgent(p), p.stat().st_mtime, p))
            except FileNotFoundError:  # finished meanwhile
                continue
        return [p for _, _, p in sorted(files)]

    @property
    def dead_letter(self) -> Path:
        """Instances that cannot be answered, each beside ``<UID>.why`` (JSON: the reason)."""
        return self.root / "dead-letter"

    def parked(self, kind: str) -> Path:
        """Results a destination refused for good, each beside ``<name>.why``."""
        return self.root / f"dead-letter-{kind}"

    @staticmethod
    def _why(folder: Path, name: str, reason: str, **detail: object) -> None:
        import datetime as dt

        _mkdir(folder)
        why = {"reason": reason, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **detail}
        _write(folder / f"{name}.why", (json.dumps(why) + "\n").encode())

    def set_aside(self, uid: str, reason: str) -> None:
        """An instance that cannot be answered leaves the queue for ``dead-letter/`` with its reason (the reason
        first, so a crash in between leaves the instance queued, never lost)."""
        self._why(self.dead_letter, uid, reason)
        src = self.incoming / f"{uid}.dcm"
        if src.exists():
            src.replace(self.dead_letter / f"{uid}.dcm")
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        (self.screened / f"{uid}.json").unlink(missing_ok=True)
        fsync_dir(self.incoming)
        fsync_dir(self.dead_letter)

    def park(self, kind: str, f: Path, reason: str) -> Path:
        """A result its destination refused for good, out of the outbox into ``dead-letter-<kind>/``."""
        folder = self.parked(kind)
        self._why(folder, f.name, reason)
        f.replace(folder / f.name)
        f.with_name(f"{f.name}.urgent").unlink(missing_ok=True)
        fsync_dir(folder)
        return folder / f.name

    def redeliver(self) -> dict[str, int]:
        """Parked results back into their outboxes (their reasons removed); the count per destination."""
        moved = {}
        for kind, outbox in self.outboxes.items():
            folder, n = self.parked(kind), 0
            for f in sorted(folder.glob("*")) if folder.is_dir() else []:
                if f.suffix == ".why" or f.name.startswith("."):
                    continue
                f.replace(outbox / f.name)
                (folder / f"{f.name}.why").unlink(missing_ok=True)
                n += 1
            if n:
                fsync_dir(outbox)
            moved[kind] = n
        return moved

    def finish(self, uid: str, results: list[tuple[str, str, bytes]], *, urgent: bool = False) -> None:
        """Results into their outboxes (``(kind, name, data)``; an urgent study's marked ``<name>.urgent`` first,
        and each result dated with the instance's arrival, for the end-to-end latency), then the done marker, then
        the incoming file and its marker away (in that order)."""

        src = self.incoming / f"{uid}.dcm"
        try:
            arrived = src.stat().st_mtime
        except FileNotFoundError:
            arrived = None
        self._to_outboxes(results, urgent=urgent, arrived=arrived)
        _write(self.done / uid, b"")
        self._clear(uid)

    def _clear(self, uid: str) -> None:
        """A done instance's file, urgency marker and screened record away."""
        (self.incoming / f"{uid}.dcm").unlink(missing_ok=True)
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        (self.screened / f"{uid}.json").unlink(missing_ok=True)
        fsync_dir(self.incoming)

    def _to_outboxes(self, results: list[tuple[str, str, bytes]], *, urgent: bool, arrived: float | None) -> None:
        """Each result into its destination's outbox (urgent marker first), dated with the film's arrival so that
        the end-to-end latency counts from it. A result its destination already confirmed (a crash after the
        delivery, before the done marker) is not queued again."""
        for kind, name, data in results:
            if kind in self.outboxes and not self.was_delivered(kind, name):
                if urgent:
                    _write(self.outboxes[kind] / f"{name}.urgent", b"")
                _write(self.outboxes[kind] / name, data)
                if arrived is not None:
                    os.utime(self.outboxes[kind] / name, (arrived, arrived))

    @property
    def studies(self) -> Path:
        """Screened instances waiting for the rest of their study: ``studies/<Study UID>/<UID>.dcm`` and
        ``<UID>.json`` (the answer)."""
        return self.root / "studies"

    def hold(self, study: str, uid: str, answer: bytes, *, urgent: bool = False) -> None:
        """A screened instance into its study's folder (the answer first, then the instance, then the markers)."""
        folder = _mkdir(self.studies / study)
        if urgent:
            _write(folder / ".urgent", b"")
        _write(folder / f"{uid}.json", answer)
        src = self.incoming / f"{uid}.dcm"
        if src.exists():
            src.replace(folder / f"{uid}.dcm")  # keeps its arrival time
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        (self.screened / f"{uid}.json").unlink(missing_ok=True)
        fsync_dir(self.incoming)
        fsync_dir(folder)

    @property
    def answered(self) -> Path:
        """Studies answered already: ``answered/<Study UID>/`` holds each answered film's answer (``<UID>.json``) and
        header without pixels (``<UID>.hdr``), and ``report.json``: the last study SR (its UIDs, Instance Number,
        version) and the films it answered. A film that comes later amends the study's result from there."""
        return self.root / "answered"

    def study_answered(self, study: str) -> tuple[list[tuple[str, dict, Path]], dict | None]:
        """The films a study was answered with (``(UID, answer, header file)``) and its last report (``None``:
        never answered)."""
        folder = self.answered / study
        try:
            report = dict(json.loads((folder / "report.json").read_text()))
        except FileNotFoundError:
            return [], None
        films = [(uid, dict(json.loads((folder / f"{uid}.json").read_text())), folder / f"{uid}.hdr")
                 for uid in report["films"]]
        return films, report

    def finish_study(self, folder: Path, uids: list[str], results: list[tuple[str, str, bytes]], *,
                     keep: dict[str, tuple[bytes, bytes]] | None = None, report: dict | None = None) -> None:
        """A study's results into their outboxes (dated with its first arrival), then (``keep``: UID -> (answer,
        header)) the answered films and the ``report`` into ``answered/<Study UID>/`` (the report last: it names the
        films), then every instance's done marker, then the study's folder away."""
        import shutil

        urgent = (folder / ".urgent").exists()
        arrived = min((p.stat().st_mtime for p in folder.glob("*.dcm")), default=None)
        self._to_outboxes(results, urgent=urgent, arrived=arrived)
        if report is not None:
            kept = _mkdir(self.answered / folder.name)
            for uid, (answer, header) in (keep or {}).items():
                _write(kept / f"{uid}.json", answer)
                _write(kept / f"{uid}.hdr", header)
            _write(kept / "report.json", json.dumps(report).encode())
        for uid in uids:
            _write(self.done / uid, b"")
        shutil.rmtree(folder)
        fsync_dir(self.studies)

    def queued(self, kind: str) -> list[Path]:
        """Results waiting in one outbox: urgent studies' first, then by arrival."""
        files = []
        for p in self.outboxes[kind].iterdir():
            if p.name.startswith(".") or p.suffix == ".urgent":
                continue
            if self.was_delivered(kind, p.name):  # confirmed before a crash: only its removal was left
                self._unqueue(p)
                continue
            try:
                files.append((not p.with_name(f"{p.name}.urgent").exists(), p.stat().st_mtime, p.name, p))
            except FileNotFoundError:
                continue
        return [p for *_, p in sorted(files)]

    def sent(self, f: Path) -> None:
        """A result its destination confirmed: its delivered marker (``delivered/<kind>/<name>``), then the result
        removed (with its urgency marker)."""
        kind = self.kind_of(f)
        _mkdir(self.delivered / kind)
        _write(self._delivered_marker(kind, f.name), b"")
        self._unqueue(f)

    @staticmethod
    def _unqueue(f: Path) -> None:
        f.unlink(missing_ok=True)
        f.with_name(f"{f.name}.urgent").unlink(missing_ok=True)
