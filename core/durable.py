"""Files that survive a crash once the call returns: the CSV results, the journal's rewrite, the DICOM spool."""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file, fsync, rename over ``path``, fsync the
    folder. A reader never sees a torn file. ``mode`` (e.g. ``0o600`` for credentials) is set on the temporary
    file before any byte is written, so the data is never readable by others."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    if mode is not None:
        os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


class AppendOnlyCsv:
    """A CSV file that only grows: a header when new, then one write per append, flushed and fsynced, so a
    row is on disk before the caller moves on. A torn last row left by a crash is dropped when the file is
    opened again; the complete rows already there are in :attr:`rows`. Appends from several threads are
    serialised. A file written by an earlier release keeps its own column order when it has the same columns
    (rows are appended in that order), and is rewritten whole, durably, with ``columns`` when it has others.
    """

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self._lock = threading.Lock()
        self.rows = self._recover()
        header = self._header()
        if header and header != self.columns:
            if set(header) == set(self.columns):
                self.columns = header
            else:
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
                w.writeheader()
                w.writerows(self.rows)
                write_durably(self.path, buf.getvalue().encode("utf-8"))
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        if new:
            self._write([dict(zip(self.columns, self.columns))])

    def _header(self) -> tuple[str, ...]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return ()
        with open(self.path, newline="", encoding="utf-8") as f:
            return tuple(next(csv.reader(f), []))

    def _recover(self) -> list[dict]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # a torn last row from a crash: drop it
            data = data[: data.rfind(b"\n") + 1]
            logger.warning("%s: dropping a partial last row left by an interrupted run", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
                f.flush()
                os.fsync(f.fileno())
        return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))

    def _write(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n").writerows(rows)
        self._f.write(buf.getvalue())
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, rows: list[dict]) -> None:
        """Record ``rows`` durably (one write)."""
        with self._lock:
            self._write(rows)

    def close(self) -> None:
        self._f.close()
