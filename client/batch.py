"""``cxr predict``: batch screening of files and folders, exactly one final row per input.

With ``--out results.csv`` the run keeps a journal beside the CSV
(``results.csv.journal``): every chunk's rows are appended to it with one
``write`` and fsynced before the next chunk starts, so a crash (SIGKILL of the
client, a server outage past the retries) loses at most the chunk in flight.
A rerun of the same command:

* skips inputs whose latest journal row is final (``ok``, ``not_assessable``,
  or an input ``error`` for the same file content);
* retries inputs whose latest row is a transient failure (server unavailable,
  deadline, overload, or a server error) and inputs whose content changed;
* then rewrites ``results.csv`` atomically (temporary file, fsync, rename)
  with one row per input, in input order, from the journal's latest rows.

The exit code is 0 only when every input has a final answer that is not an
error (``not_assessable`` counts as an answer), 1 otherwise, 2 when no input
was found.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cxr.client.results import CSV_COLUMNS, JOURNAL_COLUMNS, as_json, from_row, table, to_row
from cxr.core import contract
from cxr.core.durable import AppendOnlyCsv, write_durably
from cxr.core.security import TlsClient

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"


@dataclass(frozen=True)
class PredictOptions:
    """What ``cxr predict`` does.

    Attributes:
        inputs: Files or folders (walked recursively for image suffixes).
        url: Server address (comma lists are for fleets), or the repository for ``embedded``.
        protocol: ``grpc``, ``http`` or ``embedded``.
        model: Served model name.
        timeout_s: Per-request deadline.
        format: ``table``, ``json`` or ``csv``.
        out: Output file; for ``csv`` it is resumable (journal beside it).
        chunk: Images decoded and sent per step (and journaled together).
        eligibility: A DICOM eligibility rules file overriding the served rules.
        retries: Tries per request before a chunk's images are recorded as transient errors (a rerun retries them).
        tls: TLS settings for the server (:class:`cxr.core.security.TlsClient`).
        config_key: Key for a server that restricts model-config.
        ray: Run on a Ray cluster at this address (``auto``: the local cluster); see :mod:`cxr.client.ray_batch`.
        metrics_port: Serve Prometheus metrics of the answers on this loopback port while the run lasts
            (:mod:`cxr.client.metrics`; 0 picks a free port).
        metrics_file: Write the metrics in the Prometheus text format to this file after every chunk
            (for node_exporter's textfile collector).
    """

    inputs: tuple[Path, ...]
    url: str | None = None
    protocol: str = "grpc"
    model: str = "pneumonia"
    timeout_s: float = 30.0
    format: str = "table"
    out: Path | None = None
    chunk: int = 64
    eligibility: Path | None = None
    retries: int = 6
    tls: TlsClient | None = None
    config_key: str | None = field(default=None, repr=False)
    ray: str | None = None
    metrics_port: int | None = None
    metrics_file: Path | None = None

    def __post_init__(self) -> None:
        if self.ray and (self.metrics_port is not None or self.metrics_file is not None):
            raise ValueError("metrics are counted by the local client; they are not available with --ray")
        if self.retries < 1:
            raise ValueError("retries must be >= 1")
        if not self.inputs:
            raise ValueError("give at least one input")
        if self.format not in ("table", "json", "csv"):
            raise ValueError(f"format must be table, json or csv, got {self.format!r}")
        if self.chunk < 1:
            raise ValueError("chunk must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")


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
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


class Journal:
    """Append-only record of results; the latest row per path wins.

    Attributes:
        path: The journal file.
        latest: Latest row per input path.
    """

    def __init__(self, path: Path, *, seed_csv: Path | None = None) -> None:
        self.path = Path(path)
        self.latest: dict[str, dict] = {}
        if not self.path.exists() and seed_csv is not None and seed_csv.exists() and seed_csv.stat().st_size:
            self._seed(seed_csv)
        self._csv = AppendOnlyCsv(self.path, JOURNAL_COLUMNS)
        for r in self._csv.rows:
            self.latest[r["path"]] = r

    def _seed(self, csv_path: Path) -> None:
        """Adopt the rows of a results CSV written by an earlier release (their errors are retried)."""
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
        for r in rows:
            r.setdefault("status", contract.Status.ERROR.value if r.get("error") else contract.Status.OK.value)
            r["retryable"] = "1" if r.get("error") else "0"
        write_csv_atomically(self.path, JOURNAL_COLUMNS, rows)

    def append(self, rows: list[dict]) -> None:
        """Record rows durably (one write, flushed and fsynced)."""
        self._csv.append(rows)
        for r in rows:
            self.latest[r["path"]] = r

    def is_final(self, path: str, sha: str) -> bool:
        """True when the latest row for ``path`` needs no rerun."""
        r = self.latest.get(path)
        if r is None or r.get("sha256", "") != sha:
            return False
        return not (r.get("status") == contract.Status.ERROR.value and r.get("retryable") == "1")

    def close(self) -> None:
        self._csv.close()


def materialise(journal: Journal, paths: list[Path], out: Path) -> list[dict]:
    """Write ``out`` atomically with one row per input (latest journal row), in input order; return the rows."""
    rows = [journal.latest[str(p)] for p in paths if str(p) in journal.latest]
    write_csv_atomically(out, CSV_COLUMNS, rows)
    return rows


def write_csv_atomically(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Header and rows, written whole or not at all (:func:`cxr.core.durable.write_durably`)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_durably(path, buf.getvalue().encode("utf-8"))


def run_predict(opts: PredictOptions) -> int:
    """Implementation of ``cxr predict`` (see ``cxr predict --help``)."""
    from cxr.core.eligibility import Eligibility

    paths = expand_inputs(opts.inputs)
    if not paths:
        print("cxr predict: no input files found", file=sys.stderr)
        return 2
    journal = None
    if opts.out is not None and opts.format == "csv":
        journal = Journal(opts.out.with_name(opts.out.name + JOURNAL_SUFFIX), seed_csv=opts.out)
    todo = []
    for p in paths:
        sha = file_sha256(p)
        if journal is not None and journal.is_final(str(p), sha):
            continue
        todo.append((p, sha))
    if journal is not None and len(todo) < len(paths):
        retry = sum(1 for p, _ in todo if str(p) in journal.latest)
        print(f"resuming: {len(paths) - len(todo)} of {len(paths)} inputs already final in {opts.out}"
              + (f"; retrying {retry}" if retry else ""), file=sys.stderr)
    rows: list[dict] = []
    rules = Eligibility.load(opts.eligibility) if opts.eligibility else None
    try:
        if todo and opts.ray:
            from cxr.client import ray_batch

            ray_batch.screen(opts.ray, todo, url=opts.url, protocol=opts.protocol, model=opts.model,
                             timeout_s=opts.timeout_s, chunk=opts.chunk,
                             on_rows=lambda chunk_rows: _record(chunk_rows, journal, rows), tls=opts.tls,
                             config_key=opts.config_key, eligibility=rules)
        elif todo:  # nothing left to do needs no server: the CSV is only rewritten from the journal
            _screen(opts, todo, rules, journal, rows)
    finally:
        if journal is not None:
            journal.close()
    if journal is not None:
        assert opts.out is not None
        rows = materialise(journal, paths, opts.out)
    else:
        _emit(rows, opts.format, opts.out)
    counts = {s.value: sum(1 for r in rows if r["status"] == s.value) for s in contract.Status}
    missing = len(paths) - len(rows)
    print(f"{len(rows)} of {len(paths)} inputs answered: {counts['ok']} ok, {counts['not_assessable']} not assessable, "
          f"{counts['error']} errors" + (f", {missing} without a result" if missing else "")
          + (f" (written to {opts.out})" if opts.out else ""), file=sys.stderr)
    return 1 if counts["error"] or missing else 0


def _screen(opts: PredictOptions, todo: list[tuple[Path, str]], rules, journal: Journal | None,  # type: ignore[no-untyped-def]
            rows: list[dict]) -> None:
    """Send ``todo`` chunk by chunk; journal each chunk (or collect its rows when there is no journal)."""
    from tqdm import tqdm

    from cxr.client import PneumoniaClient, RetryPolicy

    with PneumoniaClient(opts.url, protocol=opts.protocol, model=opts.model, timeout_s=opts.timeout_s,
                         eligibility=rules, retry=RetryPolicy(attempts=opts.retries), tls=opts.tls,
                         config_key=opts.config_key) as client:
        metrics = None
        if opts.metrics_port is not None or opts.metrics_file is not None:
            from cxr.client.metrics import ScreeningMetrics, device_of

            metrics = ScreeningMetrics(client.info.ood_threshold)
            if opts.metrics_port is not None:
                print(f"metrics on http://127.0.0.1:{metrics.serve(opts.metrics_port)}/metrics", file=sys.stderr)
        bar = tqdm(total=len(todo), unit="img", desc="predict", disable=len(todo) < 2 or not sys.stderr.isatty())
        try:
            for start in range(0, len(todo), opts.chunk):
                part = todo[start : start + opts.chunk]
                preds = client.predict([str(p) for p, _ in part])
                _record([to_row(pr, sha) for pr, (_, sha) in zip(preds, part)], journal, rows)
                if metrics is not None:
                    for pr, (path, _) in zip(preds, part):
                        manufacturer, station = device_of(path)
                        metrics.observe(pr, manufacturer=manufacturer, station=station)
                    if opts.metrics_file is not None:
                        metrics.write(opts.metrics_file)
                bar.update(len(part))
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()


def _record(chunk_rows: list[dict], journal: Journal | None, rows: list[dict]) -> None:
    """One chunk's answers, however they were computed: errors on stderr, then into the journal (or the
    in-memory rows when there is none)."""
    for r in chunk_rows:
        if r["status"] == contract.Status.ERROR.value:
            print(f"error: {r['reason']}", file=sys.stderr)
    if journal is not None:
        journal.append(chunk_rows)
    else:
        rows.extend(chunk_rows)


def _emit(rows: list[dict], fmt: str, out: Path | None) -> None:
    """Present this run's rows (no journal): JSON and the table from the predictions they encode, CSV as is."""
    stream = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout  # noqa: SIM115
    try:
        if fmt == "csv":
            w = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            return
        decoded = [from_row(r) for r in rows]
        if fmt == "json":
            stream.write(json.dumps([as_json(p, sha) for p, sha in decoded], indent=1) + "\n")
        else:
            stream.write(table([p for p, _ in decoded]))
    finally:
        if out:
            stream.close()
