"""The one sha256 of a file: model integrity (export, server start-up, the Python backend), provenance rows, the
screening page's audit records and the examples' manifest all use :func:`sha256_file`."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Raises:
        OSError: The file cannot be read (never a digest that would stand for every unreadable file).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
