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

import contextlib
import csv
import hashlib
import io
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cxr.client.results import CSV_COLUMNS, JOURNAL_COLUMNS, as_json, from_row, table, to_row
from cxr.core import contract
from cxr.core.durable import AppendOnlyCsv, write_durably
from cxr.core.errors import InvalidInputError
from cxr.core.security import TlsClient

if TYPE_CHECKING:
    from cxr.client.metrics import ScreeningMetrics
    from cxr.core.audit_trail import AuditLog

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
        metrics_port: Serve Prometheus metrics of the answers on this port while the run lasts
        metrics_host: The address they are served on (loopback by default)
            (:mod:`cxr.client.metrics`; 0 picks a free port).
        metrics_file: Write the metrics in the Prometheus text format to this file after every chunk
            (for node_exporter's textfile collector).
        dicomweb: Read the inputs from this DICOMweb root instead of files (QIDO-RS, then WADO-RS); the CSV's
            ``path`` is each instance's SOP Instance UID. :func:`run_predict` reads them through its ``source``
            (:class:`cxr.doors.dicomweb.DicomWebSource`).
        studies: With ``dicomweb``: these studies (Study Instance UIDs).
        query: With ``dicomweb``: QIDO-RS study filters, ``KEY=VALUE`` (e.g. ``ModalitiesInStudy=DX``).
        priority: ``urgent`` or ``routine``: the Triton priority level of the requests.
        fhir_out: Write the answered inputs' FHIR results here (a transaction Bundle).
        fhir_url: POST them to this FHIR server's base URL (both through :func:`run_predict`'s ``delivery``,
            :class:`cxr.doors.fhir.FhirDelivery`).
        audit_log: Append the run's events to this audit trail (:mod:`cxr.core.audit_trail`).
        operating_point: Answer every input at this served operating point (``None``: by the DICOM patient's age
            where stated, else the model's default). A journaled answer at another named point is screened again.
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
    metrics_host: str = "127.0.0.1"
    metrics_file: Path | None = None
    dicomweb: str | None = None
    studies: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    priority: str = contract.DEFAULT_PRIORITY
    fhir_out: Path | None = None
    fhir_url: str | None = None
    audit_log: Path | None = None
    operating_point: str | None = None

    def __post_init__(self) -> None:
        from cxr.core.security import check_url

        check_url(self.dicomweb, "--dicomweb")
        check_url(self.fhir_url, "--fhir-url")
        if not self.inputs and not self.dicomweb:
            raise InvalidInputError("no input: give at least one input (files or folders), or --dicomweb URL")
        if self.studies and self.query:
            raise InvalidInputError("--study names the studies, --query searches for them: give one or the other")
        if self.ray and (self.metrics_port is not None or self.metrics_file is not None):
            raise ValueError("metrics are counted by the local client; they are not available with --ray")
        if self.retries < 1:
            raise ValueError("retries must be >= 1")
        if self.dicomweb and self.inputs:
            raise ValueError("give files or --dicomweb, not both")
        if self.dicomweb and self.ray:
            raise ValueError("--dicomweb reads the instances into this machine's spool; it does not run with --ray")
        if (self.studies or self.query) and not self.dicomweb:
            raise ValueError("--study and --query select studies on a DICOMweb server: give --dicomweb URL")
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


def _actor() -> str:
    import getpass

    try:
        return f"user:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name (a container): the process stands for the user
        from cxr.core.audit_trail import default_actor

        return default_actor()


class InputSource(Protocol):
    """Inputs of ``cxr predict`` that are not files, listed first and then read batch by batch into a private folder
    of the run (the DICOMweb door: :class:`cxr.doors.dicomweb.DicomWebSource`)."""

    @property
    def where(self) -> str:
        """Where the inputs come from, as messages name it."""

    @property
    def kind(self) -> str:
        """The audit trail's ``source`` of each instance received (e.g. ``dicomweb``)."""

    def find(self) -> tuple[tuple[str, str], ...]:
        """Every instance, ``(Study Instance UID, name)`` (the name is the row's ``path``: a SOP Instance UID), in
        its order; nothing is read yet."""

    def read(self, names: list[str], folder: Path) -> Mapping[Path, str]:
        """Read these instances into ``folder`` (files readable by the owner only); each file read -> its name.
        One that cannot be read is left out (the run reports it, and it counts as an input without a result).

        A source may also have ``close()``: :func:`run_predict` calls it when the run ends, before the run's folder
        is removed (a reader still writing there would leave a file behind); and ``read_headers(names, folder)``,
        :meth:`read` for the headers alone (no pixels): with a ``delivery``, the headers of the instances a rerun
        does not read again (final in the journal), so that their results are delivered with their study and
        patient."""


#: ``cxr predict``'s exit status when results remain undelivered for now (EX_TEMPFAIL, as ``cxr.cli`` exits for an
#: upstream that is unreachable or failing): a rerun later delivers them.
EXIT_TEMPFAIL = 75


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


class ResultDelivery(Protocol):
    """Where ``cxr predict`` also delivers the answers once the run is over (the FHIR door:
    :class:`cxr.doors.fhir.FhirDelivery`)."""

    def deliver(self, rows: list[dict], files: Mapping[str, Path], audit: AuditLog | None, actor: str) -> Delivered:
        """Deliver the answered ``rows`` (``files``: each row's ``path`` -> its file), each delivery audited as
        ``actor``; what was not delivered."""


def run_predict(opts: PredictOptions, *, source: InputSource | None = None,
                delivery: ResultDelivery | None = None) -> int:
    """Implementation of ``cxr predict`` (see ``cxr predict --help``). ``source`` reads the inputs that are not
    files (``opts.dicomweb``), ``delivery`` takes the answers after the run (``opts.fhir_out``, ``opts.fhir_url``):
    the hospital's doors, given by the caller (``cxr.cli``)."""
    import tempfile
    from contextlib import ExitStack

    from cxr.core.audit_trail import AuditLog

    if (source is not None) != bool(opts.dicomweb):
        raise ValueError("run_predict: give source (cxr.doors.dicomweb.DicomWebSource) exactly when "
                         "PredictOptions.dicomweb is set")
    if (delivery is None) != (opts.fhir_out is None and opts.fhir_url is None):
        raise ValueError("run_predict: give delivery (cxr.doors.fhir.FhirDelivery) exactly when "
                         "PredictOptions.fhir_out or fhir_url is set")
    with ExitStack() as stack:
        audit = stack.enter_context(AuditLog(opts.audit_log, component="cxr predict")) if opts.audit_log else None
        if source is not None:
            # a private folder (0700) for the instances in flight, removed however the run ends (SIGTERM included)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"cxr-{source.kind}-")))
            close = getattr(source, "close", None)
            if close is not None:  # its readers finish and its connections close before the folder goes
                stack.callback(close)
            stack.enter_context(_terminate_as_interrupt())
            instances = source.find()
            if not instances:
                print(f"cxr predict: nothing to screen: no instance matches on {source.where}", file=sys.stderr)
                return 0
            rows, total, delivered_files = _run_streaming(opts, source, instances, folder, audit,
                                                          keep_headers=delivery is not None)
        else:
            paths = expand_inputs(opts.inputs)
            if not paths:
                print("cxr predict: no input files found", file=sys.stderr)
                return 2
            rows, total = _run(opts, paths, {}, audit), len(paths)
            delivered_files = {str(p): p for p in paths}
        counts = {s.value: sum(1 for r in rows if r["status"] == s.value) for s in contract.Status}
        missing = total - len(rows)
        sent = Delivered()
        if delivery is not None:
            sent = delivery.deliver(rows, delivered_files, audit, _actor())
        print(f"{len(rows)} of {total} inputs answered: {counts['ok']} ok, "
              f"{counts['not_assessable']} not assessable, {counts['error']} errors"
              + (f", {missing} without a result" if missing else "")
              + (f", {sent.undelivered} results not delivered" + (" (rerun to deliver them)" if sent.retryable else "")
                 if sent.undelivered else "")
              + (f" (written to {opts.out})" if opts.out else ""), file=sys.stderr)
        if counts["error"] or missing or (sent.undelivered and not sent.retryable):
            return 1
        return EXIT_TEMPFAIL if sent.undelivered else 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`KeyboardInterrupt`, as SIGINT does, while the block runs (in the main thread): the
    run saves the rows done and removes its temporary files on either."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _run_streaming(opts: PredictOptions, source: InputSource, instances: tuple[tuple[str, str], ...], folder: Path,
                   audit, *, keep_headers: bool) -> tuple[list[dict], int, dict[str, Path]]:
    """Screen a source's instances as they are read: instances already final in the journal are skipped before
    they are read; the rest are read, screened and journaled in batches of ``opts.chunk`` (the disk holds one batch,
    never the query), each batch's files removed once its rows are journaled. Interrupted (SIGINT, SIGTERM), the
    rows done are saved (``opts.out``) before the interrupt goes on. Returns every instance's row, how many
    instances there are, and (``keep_headers``, for the FHIR door) each answered instance's header file, without
    pixels, in ``folder``."""
    import shutil

    from cxr.core.eligibility import Eligibility

    names = [name for _, name in instances]
    journal = None
    if opts.out is not None and opts.format == "csv":
        journal = Journal(opts.out.with_name(opts.out.name + JOURNAL_SUFFIX), seed_csv=opts.out)
    todo = [n for n in names if journal is None or not journal.is_done(n, opts.operating_point)]
    if len(todo) < len(names):
        print(f"resuming: {len(names) - len(todo)} of {len(names)} instances already final in {opts.out}; not read "
              "again", file=sys.stderr)
    study_of = {name: study for study, name in instances}
    rows: list[dict] = []
    headers: dict[str, Path] = {}
    rules = Eligibility.load(opts.eligibility) if opts.eligibility else None
    try:
        if todo:
            with _Screener(opts, rules, check_server=True) as screener:  # the server answers before anything is read
                for start in range(0, len(todo), opts.chunk):
                    part = todo[start : start + opts.chunk]
                    batch = folder / f"batch-{start}"
                    batch.mkdir(mode=0o700)
                    files = source.read(part, batch)
                    got = set(files.values())
                    for name in part:
                        if name not in got:
                            print(f"error: {name}: could not be read from {source.where} (rerun to retry)",
                                  file=sys.stderr)
                        if audit is not None:
                            audit.event("received", actor=_actor(), outcome="success" if name in got else "failure",
                                        study_uid=study_of[name], instance_uid=name, source=source.kind)
                    paths = sorted(files, key=lambda f: files[f])
                    screener.screen([(f, file_sha256(f)) for f in paths], journal, rows,
                                    lambda f, files=files: files[f], audit)
                    if keep_headers:
                        for f in paths:
                            headers[files[f]] = _header_copy(f, folder / "headers")
                    shutil.rmtree(batch)
    except KeyboardInterrupt:
        if journal is not None:
            assert opts.out is not None
            journal.close()
            # the rows on disk, read again: the interrupt may have come between a chunk's write and the bookkeeping
            # in memory, and the rerun counts what the file holds
            journal = Journal(journal.path)
            journal.close()
            done = materialise(journal, [Path(n) for n in names], opts.out)
            print(f"interrupted: {len(done)} of {len(names)} rows saved in {opts.out}; rerun to finish",
                  file=sys.stderr)
            journal = None
        elif rows:  # no journal: this run's rows are shown, or written, as they would have been
            _emit(rows, opts.format, opts.out)
            print(f"interrupted: {len(rows)} of {len(names)} rows written", file=sys.stderr)
        raise
    finally:
        if journal is not None:
            journal.close()
    if journal is not None:
        assert opts.out is not None
        rows = materialise(journal, [Path(n) for n in names], opts.out)
        if audit is not None:
            audit.event("result_delivered", actor=_actor(), destination="csv", rows=len(rows))
    else:
        _emit(rows, opts.format, opts.out)
    if keep_headers:  # answered by an earlier run, not read again: their headers, for the delivery
        earlier = [r["path"] for r in rows if r["status"] != contract.Status.ERROR.value and r["path"] not in headers]
        read_headers = getattr(source, "read_headers", None)
        if earlier and read_headers is not None:
            (folder / "headers").mkdir(mode=0o700, exist_ok=True)
            got = read_headers(earlier, folder / "headers")
            headers.update({name: f for f, name in got.items()})
            print(f"read the headers (no pixels) of {len(got)} instances answered earlier, for their delivery",
                  file=sys.stderr)
            for name in earlier:
                if name not in headers:
                    print(f"warning: {name}: header not read from {source.where}; its result goes without its study",
                          file=sys.stderr)
    return rows, len(names), headers


def _header_copy(f: Path, folder: Path) -> Path:
    """A DICOM file's header without its pixels, in ``folder`` (readable by the owner only)."""
    import os

    import pydicom

    folder.mkdir(mode=0o700, exist_ok=True)
    out = folder / f.name
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
    except Exception:  # noqa: BLE001 - not DICOM: the result stands without a study
        out.write_bytes(b"")
    return out


def _run(opts: PredictOptions, paths: list[Path], names: dict[str, str], audit) -> list[dict]:
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
            audit.event("result_delivered", actor=_actor(), destination="csv", rows=len(rows))
    else:
        _emit(rows, opts.format, opts.out)
    return rows


def _screen(opts: PredictOptions, todo: list[tuple[Path, str]], rules, journal: Journal | None,
            rows: list[dict], key=str, audit=None) -> None:
    """Send ``todo`` chunk by chunk; journal each chunk (or collect its rows when there is no journal)."""
    with _Screener(opts, rules) as screener:
        screener.screen(todo, journal, rows, key, audit)


class _Screener:
    """One client (and the run's metrics) for every chunk of a run. With ``check_server`` the server is asked for
    its model when the block starts, so that a run with no server answering says so in one line before it reads
    anything (a DICOMweb query is not fetched for nothing)."""

    def __init__(self, opts: PredictOptions, rules, *, check_server: bool = False) -> None:
        self.opts = opts
        self.rules = rules
        self.check_server = check_server
        self.metrics: ScreeningMetrics | None = None

    def __enter__(self) -> _Screener:
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
            audit.event("screened", actor=_actor(), outcome="failure" if r["status"] == "error" else "success",
                        instance_uid=r["sop_instance_uid"] or f"sha256:{r['sha256']}", model_sha256=r["model_sha256"],
                        status=r["status"], rule=r["rule"] or None,
                        probability=float(r["probability"]) if r["probability"] else None)
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
