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


class AppendOnlyLines:
    """A text file of lines that only grows: one write per append, flushed and fsynced before the call returns.

    A torn last line left by a crash is cut off when the file is opened again (and said in the log). Only the
    last line is kept in memory (:attr:`last`). Appends are serialised between threads (a lock) and between
    processes (``flock`` on the file; a line written by another process since this one's last append is read
    back first), so a chained log whose next line depends on the last one stays one chain.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cut_torn_tail()
        new = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        self._fd = fd
        if new:
            fsync_dir(self.path.parent)
        self._size = -1
        self.last: str | None = None
        self._refresh()

    def _cut_torn_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            keep = self._last_newline(f, size) + 1
            logger.warning("%s: cutting a partial last line left by an interrupted run", self.path)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _last_newline(f, end: int) -> int:
        """Offset of the last newline in the file's first ``end`` bytes (-1 when there is none)."""
        pos = end
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                return pos - step + i
            pos -= step
        return -1

    def _refresh(self) -> None:
        """Read the file's last complete line when the file grew since this object last saw it."""
        size = os.fstat(self._fd).st_size
        if size == self._size:
            return
        if size == 0:
            self.last = None
        else:
            with open(self.path, "rb") as f:
                end = size - 1  # the final newline
                start = self._last_newline(f, end) + 1
                f.seek(start)
                self.last = f.read(end - start).decode("utf-8")
        self._size = size

    def append(self, line: str) -> None:
        """Write one line (no newline inside) durably."""
        self.append_with(lambda _last: line)

    def append_with(self, make) -> str:
        """Write the line ``make(last)`` builds from the file's last line (``None`` when empty), under the locks;
        returns it."""
        import fcntl

        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._refresh()
                line = make(self.last)
                if "\n" in line or "\r" in line:
                    raise ValueError("a line must not contain a line break")
                data = line.encode("utf-8") + b"\n"
                os.write(self._fd, data)
                os.fsync(self._fd)
                self._size = os.fstat(self._fd).st_size
                self.last = line
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            return line

    def close(self) -> None:
        os.close(self._fd)
