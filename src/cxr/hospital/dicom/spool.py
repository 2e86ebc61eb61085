"""The listener's durable state folder: every state of every instance and result is a file, so a restart finishes
whatever was in flight and never drops or duplicates a result (the layout: :mod:`cxr.hospital.dicom`)."""

from __future__ import annotations

from pathlib import Path

from cxr.core.durable import fsync_dir, write_durably


class Spool:
    """The durable state folder."""

    #: Outbox folder per destination kind.
    OUTBOXES = {"dimse": "outbox", "stow": "outbox-stow", "fhir": "outbox-fhir"}

    def __init__(self, root: Path, destinations: tuple[str, ...] = ("dimse",)) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.done = self.root / "done"
        self.outboxes = {k: self.root / self.OUTBOXES[k] for k in destinations}
        for d in (self.incoming, self.outbox, self.done, *self.outboxes.values()):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.root.rglob(".*.tmp"):  # a crash mid-write: the sender was never told success
            stale.unlink(missing_ok=True)

    def is_done(self, uid: str) -> bool:
        return (self.done / uid).exists()

    def receive(self, uid: str, data: bytes, *, urgent: bool = False) -> bool:
        """Store an incoming instance durably (an urgent one's marker first); ``False`` when it was already
        screened (a duplicate)."""
        if self.is_done(uid):
            return False
        if urgent:
            write_durably(self.incoming / f"{uid}.urgent", b"")
        write_durably(self.incoming / f"{uid}.dcm", data)
        return True

    def is_urgent(self, path: Path) -> bool:
        return path.with_suffix(".urgent").exists()

    def pending(self) -> list[Path]:
        """Instances waiting, urgent ones first, each group in arrival order."""
        files = []
        for p in self.incoming.glob("*.dcm"):
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
        import json

        folder.mkdir(exist_ok=True)
        why = {"reason": reason, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **detail}
        write_durably(folder / f"{name}.why", (json.dumps(why) + "\n").encode())

    def set_aside(self, uid: str, reason: str) -> None:
        """An instance that cannot be answered leaves the queue for ``dead-letter/`` with its reason (the reason
        first, so a crash in between leaves the instance queued, never lost)."""
        self._why(self.dead_letter, uid, reason)
        src = self.incoming / f"{uid}.dcm"
        if src.exists():
            src.replace(self.dead_letter / f"{uid}.dcm")
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
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
        write_durably(self.done / uid, b"")
        src.unlink(missing_ok=True)
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        fsync_dir(self.incoming)

    def _to_outboxes(self, results: list[tuple[str, str, bytes]], *, urgent: bool, arrived: float | None) -> None:
        """Each result into its destination's outbox (urgent marker first), dated with the film's arrival so that
        the end-to-end latency counts from it."""
        import os

        for kind, name, data in results:
            if kind in self.outboxes:
                if urgent:
                    write_durably(self.outboxes[kind] / f"{name}.urgent", b"")
                write_durably(self.outboxes[kind] / name, data)
                if arrived is not None:
                    os.utime(self.outboxes[kind] / name, (arrived, arrived))

    @property
    def studies(self) -> Path:
        """Screened instances waiting for the rest of their study: ``studies/<Study UID>/<UID>.dcm`` and
        ``<UID>.json`` (the answer)."""
        return self.root / "studies"

    def hold(self, study: str, uid: str, answer: bytes, *, urgent: bool = False) -> None:
        """A screened instance into its study's folder (the answer first, then the instance, then the markers)."""
        folder = self.studies / study
        folder.mkdir(parents=True, exist_ok=True)
        if urgent:
            write_durably(folder / ".urgent", b"")
        write_durably(folder / f"{uid}.json", answer)
        src = self.incoming / f"{uid}.dcm"
        if src.exists():
            src.replace(folder / f"{uid}.dcm")  # keeps its arrival time
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        fsync_dir(self.incoming)
        fsync_dir(folder)

    def finish_study(self, folder: Path, uids: list[str], results: list[tuple[str, str, bytes]]) -> None:
        """A study's results into their outboxes (dated with its first arrival), then every instance's done marker,
        then the study's folder away."""
        import shutil

        urgent = (folder / ".urgent").exists()
        arrived = min((p.stat().st_mtime for p in folder.glob("*.dcm")), default=None)
        self._to_outboxes(results, urgent=urgent, arrived=arrived)
        for uid in uids:
            write_durably(self.done / uid, b"")
        shutil.rmtree(folder)
        fsync_dir(self.studies)

    def queued(self, kind: str) -> list[Path]:
        """Results waiting in one outbox: urgent studies' first, then by arrival."""
        files = []
        for p in self.outboxes[kind].iterdir():
            if p.name.startswith(".") or p.suffix == ".urgent":
                continue
            try:
                files.append((not p.with_name(f"{p.name}.urgent").exists(), p.stat().st_mtime, p.name, p))
            except FileNotFoundError:
                continue
        return [p for *_, p in sorted(files)]

    def sent(self, f: Path) -> None:
        """A result its destination confirmed: removed (with its urgency marker)."""
        f.unlink(missing_ok=True)
        f.with_name(f"{f.name}.urgent").unlink(missing_ok=True)
