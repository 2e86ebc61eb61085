"""``cxr predict``'s screening: files (or instances read into a folder) screened by one client, exactly one final row
per input (the application above it, where the inputs come from and where the results go, is
:mod:`cxr.doors.predict`).

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

``cxr predict`` exits 0 only when every input has a final answer that is not an
error (``not_assessable`` counts as an answer), 1 otherwise, 2 when no input
was found (``cxr.cli`` decides, from :class:`cxr.doors.predict.PredictSummary`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.client.results import CSV_COLUMNS, JOURNAL_COLUMNS, as_json, from_row, table, to_row
from cxr.core import contract
from cxr.core.durable import AppendOnlyCsv, write_durably
from cxr.core.security import TlsClient

if TYPE_CHECKING:
    from cxr.client.metrics import ScreeningMetrics

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"


@dataclass(frozen=True)
class ScreenOptions:
    """How ``cxr predict`` screens: the client's side of its options (where the inputs come from and where the
    results go besides the CSV are :class:`cxr.doors.predict.ScreenOptions`, which adds them).

    Attributes:
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
        metrics_port: Serve Prometheus metrics of the answers on this port while the run lasts
        metrics_host: The address they are served on (loopback by default)
            (:mod:`cxr.client.metrics`; 0 picks a free port).
        metrics_file: Write the metrics in the Prometheus text format to this file after every chunk
            (for node_exporter's textfile collector).
        priority: ``urgent`` or ``routine``: the Triton priority level of the requests.
        operating_point: Answer every input at this served operating point (``None``: by the DICOM patient's age
            where stated, else the model's default). A journaled answer at another named point is screened again.
    """

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
    metrics_host: str = "127.0.0.1"
    metrics_file: Path | None = None
    priority: str = contract.DEFAULT_PRIORITY
    operating_point: str | None = None

    def __post_init__(self) -> None:
        if self.ray and (self.metrics_port is not None or self.metrics_file is not None):
            raise ValueError("metrics are counted by the local client; they are not available with --ray")
        if self.retries < 1:
            raise ValueError("retries must be >= 1")
        contract.priority_level(self.priority)
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
    """The journal's content key of an input (:func:`cxr.core.integrity.sha256_file`), ``''`` when it cannot be
    read: the journal keys on (path, content), so an unreadable file never shares a key with another path, and once
    it can be read its digest differs from ``''`` and it is screened again."""
    from cxr.core.integrity import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return ""


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

    def is_final(self, path: str, sha: str, operating_point: str | None = None) -> bool:
        """True when the latest row for ``path`` needs no rerun (with ``operating_point``: a row answered at
        another point does)."""
        r = self.latest.get(path)
        if r is None or r.get("sha256", "") != sha:
            return False
        if operating_point is not None and r.get("operating_point", "") != operating_point:
            return False
        return not (r.get("status") == contract.Status.ERROR.value and r.get("retryable") == "1")

    def is_done(self, path: str, operating_point: str | None = None) -> bool:
        """:meth:`is_final` without the file's sha256, for inputs named before they are read (a SOP Instance UID
        names one instance's content)."""
        r = self.latest.get(path)
        return r is not None and self.is_final(path, r.get("sha256", ""), operating_point)

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


def actor() -> str:
    import getpass

    try:
        return f"user:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name (a container): the process stands for the user
        from cxr.core.audit_trail import default_actor

        return default_actor()


@dataclass(frozen=True)
class Delivered:
    """What a :class:`ResultDelivery` left undone.

    Attributes:
        undelivered: Results not delivered.
        retryable: A rerun can deliver them (the destination was unreachable or failing for now): ``cxr predict``
            exits 75 (EX_TEMPFAIL), not 1.
    """

    undelivered: int = 0
    retryable: bool = False

    def __post_init__(self) -> None:
        if self.undelivered < 0:
            raise ValueError("undelivered must be >= 0")
        if self.retryable and not self.undelivered:
            raise ValueError("only undelivered results can be retryable")


def screen_files(opts: ScreenOptions, paths: list[Path], names: dict[str, str], audit) -> list[dict]:
    """Screen what is not final yet (journaled when writing a CSV), then present every input's row."""
    from cxr.core.eligibility import Eligibility

    def key(p: Path) -> str:
        return names.get(str(p), str(p))

    journal = None
    if opts.out is not None and opts.format == "csv":
        journal = Journal(opts.out.with_name(opts.out.name + JOURNAL_SUFFIX), seed_csv=opts.out)
    todo = []
    for p in paths:
        sha = file_sha256(p)
        if journal is not None and journal.is_final(key(p), sha, opts.operating_point):
            continue
        todo.append((p, sha))
    if journal is not None and len(todo) < len(paths):
        retry = sum(1 for p, _ in todo if key(p) in journal.latest)
        print(f"resuming: {len(paths) - len(todo)} of {len(paths)} inputs already final in {opts.out}"
              + (f"; retrying {retry}" if retry else ""), file=sys.stderr)
    rows: list[dict] = []
    rules = Eligibility.load(opts.eligibility) if opts.eligibility else None
    try:
        if todo and opts.ray:
            from cxr.client import ray_batch

            ray_batch.screen(opts.ray, todo, url=opts.url, protocol=opts.protocol, model=opts.model,
                             timeout_s=opts.timeout_s, chunk=opts.chunk,
                             on_rows=lambda chunk_rows: _record(chunk_rows, journal, rows, audit), tls=opts.tls,
                             config_key=opts.config_key, eligibility=rules, operating_point=opts.operating_point)
        elif todo:  # nothing left to do needs no server: the CSV is only rewritten from the journal
            _screen(opts, todo, rules, journal, rows, key, audit)
    finally:
        if journal is not None:
            journal.close()
    if journal is not None:
        assert opts.out is not None
        rows = materialise(journal, [Path(key(p)) for p in paths], opts.out)
        if audit is not None:
            audit.event("result_delivered", actor=actor(), destination="csv", rows=len(rows))
    else:
        emit(rows, opts.format, opts.out)
    return rows


def _screen(opts: ScreenOptions, todo: list[tuple[Path, str]], rules, journal: Journal | None,
            rows: list[dict], key=str, audit=None) -> None:
    """Send ``todo`` chunk by chunk; journal each chunk (or collect its rows when there is no journal)."""
    with Screener(opts, rules) as screener:
        screener.screen(todo, journal, rows, key, audit)


class Screener:
    """One client (and the run's metrics) for every chunk of a run. With ``check_server`` the server is asked for
    its model when the block starts, so that a run with no server answering says so in one line before it reads
    anything (a DICOMweb query is not fetched for nothing)."""

    def __init__(self, opts: ScreenOptions, rules, *, check_server: bool = False) -> None:
        self.opts = opts
        self.rules = rules
        self.check_server = check_server
        self.metrics: ScreeningMetrics | None = None

    def __enter__(self) -> Screener:
        from cxr.client import PneumoniaClient, RetryPolicy

        opts = self.opts
        self.client = PneumoniaClient(opts.url, protocol=opts.protocol, model=opts.model, timeout_s=opts.timeout_s,
                                      eligibility=self.rules, retry=RetryPolicy(attempts=opts.retries), tls=opts.tls,
                                      config_key=opts.config_key, priority=opts.priority,
                                      operating_point=opts.operating_point)
        try:
            if self.check_server:
                self.client.info  # noqa: B018 - raises, in one line, when no server answers
            if opts.metrics_port is not None or opts.metrics_file is not None:
                from cxr.client.metrics import ScreeningMetrics

                metrics = self.metrics = ScreeningMetrics(self.client.info.ood_threshold)
                if opts.metrics_port is not None:
                    port = metrics.serve(opts.metrics_port, opts.metrics_host)
                    host = f"[{opts.metrics_host}]" if ":" in opts.metrics_host else opts.metrics_host
                    print(f"metrics on http://{host}:{port}/metrics", file=sys.stderr)
        except BaseException:
            self.client.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.metrics is not None:
                self.metrics.close()
        finally:
            self.client.close()

    def screen(self, todo: list[tuple[Path, str]], journal: Journal | None, rows: list[dict], key=str,
               audit=None) -> None:
        """Send ``todo`` chunk by chunk; journal each chunk (or collect its rows when there is no journal)."""
        from tqdm import tqdm

        opts, metrics = self.opts, self.metrics
        bar = tqdm(total=len(todo), unit="img", desc="predict", disable=len(todo) < 2 or not sys.stderr.isatty())
        try:
            for start in range(0, len(todo), opts.chunk):
                part = todo[start : start + opts.chunk]
                preds = self.client.predict([str(p) for p, _ in part])
                chunk_rows = []
                for pr, (p, sha) in zip(preds, part):
                    row = to_row(pr, sha)
                    row["path"] = key(p)
                    chunk_rows.append(row)
                _record(chunk_rows, journal, rows, audit)
                if metrics is not None:
                    from cxr.client.metrics import device_of

                    for pr, (path, _) in zip(preds, part):
                        manufacturer, station = device_of(path)
                        metrics.observe(pr, manufacturer=manufacturer, station=station)
                    if opts.metrics_file is not None:
                        metrics.write(opts.metrics_file)
                bar.update(len(part))
        finally:
            bar.close()


def _record(chunk_rows: list[dict], journal: Journal | None, rows: list[dict], audit=None) -> None:
    """One chunk's answers, however they were computed: errors on stderr, the audit trail, then into the journal
    (or the in-memory rows when there is none)."""
    for r in chunk_rows:
        if r["status"] == contract.Status.ERROR.value:
            print(f"error: {r['reason']}", file=sys.stderr)
        if audit is not None:
            audit.event("screened", actor=actor(), outcome="failure" if r["status"] == "error" else "success",
                        instance_uid=r["sop_instance_uid"] or f"sha256:{r['sha256']}", model_sha256=r["model_sha256"],
                        status=r["status"], rule=r["rule"] or None,
                        probability=float(r["probability"]) if r["probability"] else None)
    if journal is not None:
        journal.append(chunk_rows)
    else:
        rows.extend(chunk_rows)


def emit(rows: list[dict], fmt: str, out: Path | None) -> None:
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
