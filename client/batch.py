"""``cxr predict``: batch screening of files and folders with lossless, resumable CSV output."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from cxr import contract

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "label", "probability", "threshold", "model_name", "model_version", "error", "sha256", "sop_instance_uid")


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, folders walked recursively for image suffixes (sorted); order kept, duplicates dropped."""
    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in contract.IMAGE_SUFFIXES)
        else:
            out.append(p)  # non-image or missing files get their own error row
    return list(dict.fromkeys(out))


def file_sha256(path: Path) -> str:
    """Content hash used to recognise inputs already done ('' if unreadable)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _repair_and_read(out: Path) -> set[tuple[str, str]]:
    """Drop a torn last line left by a crash; return the (path, sha256) pairs already written."""
    if not out.exists() or out.stat().st_size == 0:
        return set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
        logger.warning("%s: dropping a partial last row left by an interrupted run", out)
        with open(out, "r+b") as f:
            f.truncate(len(keep))
        data = keep
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    return {(r["path"], r.get("sha256", "")) for r in rows}


class CsvAppender:
    """Appends complete rows, each written with one ``write`` and flushed + fsynced per chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = _repair_and_read(path)
        new = not path.exists() or path.stat().st_size == 0
        self._f = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        if new:
            self._write_rows([dict(zip(CSV_COLUMNS, CSV_COLUMNS))])

    def _write_rows(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        for r in rows:
            w.writerow(r)
        self._f.write(buf.getvalue())
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, rows: list[dict]) -> None:
        self._write_rows(rows)

    def close(self) -> None:
        self._f.close()


def _row(pred, sha: str) -> dict:  # type: ignore[no-untyped-def]
    return {
        "path": pred.source,
        "label": pred.label or "",
        "probability": "" if pred.probability is None else f"{pred.probability:.6f}",
        "threshold": f"{pred.threshold:.6f}",
        "model_name": pred.model_name,
        "model_version": pred.model_version,
        "error": pred.error or "",
        "sha256": sha,
        "sop_instance_uid": pred.sop_instance_uid or "",
    }


def run_predict(a: argparse.Namespace) -> int:
    """Implementation of ``cxr predict`` (see ``cxr predict --help``)."""
    from tqdm import tqdm

    from cxr.client import PneumoniaClient

    paths = expand_inputs(a.inputs)
    if not paths:
        print("cxr predict: no input files found", file=sys.stderr)
        return 2
    appender = CsvAppender(a.out) if (a.out and a.format == "csv") else None
    todo = []
    for p in paths:
        sha = file_sha256(p)
        if appender is not None and (str(p), sha) in appender.done:
            continue
        todo.append((p, sha))
    skipped = len(paths) - len(todo)
    if skipped:
        print(f"resuming: {skipped} of {len(paths)} inputs already in {a.out}", file=sys.stderr)
    rows: list[dict] = []
    failed = 0
    with PneumoniaClient(a.url, protocol=a.protocol, model=a.model, timeout_s=a.timeout_s) as client:
        bar = tqdm(total=len(todo), unit="img", desc="predict", disable=len(todo) < 2 or not sys.stderr.isatty())
        for start in range(0, len(todo), a.chunk):
            part = todo[start : start + a.chunk]
            preds = client.predict([str(p) for p, _ in part])
            chunk_rows = [_row(pr, sha) for pr, (_, sha) in zip(preds, part)]
            for pr in preds:
                if pr.error:
                    failed += 1
                    print(f"error: {pr.error}", file=sys.stderr)
            if appender is not None:
                appender.append(chunk_rows)
            else:
                rows += chunk_rows
            bar.update(len(part))
        bar.close()
    if appender is not None:
        appender.close()
        print(f"{len(todo)} results appended to {a.out} ({failed} failed)", file=sys.stderr)
    else:
        _emit(rows, a.format, a.out)
    return 1 if failed else 0


def _emit(rows: list[dict], fmt: str, out: Path | None) -> None:
    stream = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout  # noqa: SIM115
    try:
        if fmt == "json":
            for r in rows:
                r["probability"] = float(r["probability"]) if r["probability"] else None
                r["threshold"] = float(r["threshold"])
            stream.write(json.dumps(rows, indent=1) + "\n")
        elif fmt == "csv":
            w = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        else:
            width = max([len(r["path"]) for r in rows] + [4])
            stream.write(f"{'path':<{width}}  {'label':<9}  {'prob':>6}  {'thr':>6}  model\n")
            for r in rows:
                prob = r["probability"][:6] if r["probability"] else "-"
                label = r["label"] or "ERROR"
                tail = r["error"] if r["error"] else f"{r['model_name']} v{r['model_version']}"
                stream.write(f"{r['path']:<{width}}  {label:<9}  {prob:>6}  {r['threshold'][:6]:>6}  {tail}\n")
    finally:
        if out:
            stream.close()
