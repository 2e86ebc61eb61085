"""``cxr predict``, the application: where the inputs come from (files, or a DICOMweb archive), the screening by
:mod:`cxr.client.batch` (the client, its journal and resume), and where the answers go besides the CSV (FHIR);
:func:`run_predict` returns a :class:`PredictSummary` that ``cxr.cli`` turns into its last line and exit status.

It sits in the doors' layer, above the client and the DICOMweb and FHIR doors it drives (the options name them,
the client cannot act on them), beside the DICOM listener (``cxr listen``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cxr.client.batch import (
    JOURNAL_SUFFIX,
    Delivered,
    Journal,
    Screener,
    ScreenOptions,
    actor,
    emit,
    expand_inputs,
    file_sha256,
    materialise,
    screen_files,
)
from cxr.core import contract
from cxr.core.errors import InvalidInputError

if TYPE_CHECKING:
    from cxr.core.audit_trail import AuditLog
    from cxr.doors.dicomweb import DicomWebSource
    from cxr.doors.fhir import FhirDelivery, StudyRule


@dataclass(frozen=True, kw_only=True)
class PredictOptions(ScreenOptions):
    """What ``cxr predict`` does: :class:`cxr.client.batch.ScreenOptions` (how it screens) and where the inputs
    come from and the results go.

    Attributes:
        inputs: Files or folders (walked recursively for image suffixes).
        dicomweb: Read the inputs from this DICOMweb root instead of files (QIDO-RS, then WADO-RS); the CSV's
            ``path`` is each instance's SOP Instance UID. :func:`run_predict` reads them through its ``source``
            (:meth:`source`: :class:`cxr.doors.dicomweb.DicomWebSource`).
        studies: With ``dicomweb``: these studies (Study Instance UIDs).
        query: With ``dicomweb``: QIDO-RS study filters, ``KEY=VALUE`` (e.g. ``ModalitiesInStudy=DX``).
        fhir_out: Write the answered inputs' FHIR results here (a transaction Bundle).
        fhir_url: POST them to this FHIR server's base URL (both through :func:`run_predict`'s ``delivery``,
            :meth:`delivery`: :class:`cxr.doors.fhir.FhirDelivery`).
        audit_log: Append the run's events to this audit trail (:mod:`cxr.core.audit_trail`).
    """

    inputs: tuple[Path, ...]
    dicomweb: str | None = None
    studies: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    fhir_out: Path | None = None
    fhir_url: str | None = None
    audit_log: Path | None = None

    def __post_init__(self) -> None:
        from cxr.core.security import check_url

        check_url(self.dicomweb, "--dicomweb")
        check_url(self.fhir_url, "--fhir-url")
        if not self.inputs and not self.dicomweb:
            raise InvalidInputError("no input: give at least one input (files or folders), or --dicomweb URL")
        if self.studies and self.query:
            raise InvalidInputError("--study names the studies, --query searches for them: give one or the other")
        super().__post_init__()
        if self.dicomweb and self.inputs:
            raise ValueError("give files or --dicomweb, not both")
        if self.dicomweb and self.ray:
            raise ValueError("--dicomweb reads the instances into this machine's spool; it does not run with --ray")
        if (self.studies or self.query) and not self.dicomweb:
            raise ValueError("--study and --query select studies on a DICOMweb server: give --dicomweb URL")

    def source(self) -> DicomWebSource | None:
        """The DICOMweb door these options ask for (``None``: the inputs are files)."""
        if not self.dicomweb:
            return None
        from cxr.doors.dicomweb import DicomWebSource

        return DicomWebSource(self.dicomweb, self.studies, self.query, self.timeout_s)

    def delivery(self, *, patient_id_system: str | None = None,
                 study_rule: StudyRule | None = None) -> FhirDelivery | None:
        """The FHIR door these options ask for (``None``: no FHIR results).

        Raises:
            ValueError: ``patient_id_system`` is not a URI.
        """
        if self.fhir_out is None and self.fhir_url is None:
            return None
        from cxr.doors.fhir import FhirDelivery

        return FhirDelivery(self.fhir_out, self.fhir_url, self.timeout_s, patient_id_system, study_rule=study_rule)


@dataclass(frozen=True)
class PredictSummary:
    """What a ``cxr predict`` run did (``cxr.cli`` says it in one line and exits by it).

    Attributes:
        inputs: Inputs found (files, or instances the archive listed); 0: none.
        answered: Inputs with a row (every one but those that could not be read).
        ok: Rows answered ``ok``.
        not_assessable: Rows answered ``not_assessable``.
        errors: Rows that are errors.
        undelivered: Results the delivery (FHIR) left undelivered.
        retryable: They can be delivered by a rerun (the destination was unreachable or failing for now).
        where: The archive the instances came from (``None``: files).
        out: Where the rows were written.
    """

    inputs: int = 0
    answered: int = 0
    ok: int = 0
    not_assessable: int = 0
    errors: int = 0
    undelivered: int = 0
    retryable: bool = False
    where: str | None = None
    out: Path | None = None

    def __post_init__(self) -> None:
        if min(self.inputs, self.answered, self.ok, self.not_assessable, self.errors, self.undelivered) < 0:
            raise ValueError("counts must be >= 0")
        if self.answered > self.inputs or self.ok + self.not_assessable + self.errors != self.answered:
            raise ValueError("answered must be ok + not_assessable + errors, and at most the inputs")
        if self.retryable and not self.undelivered:
            raise ValueError("only undelivered results can be retryable")

    @property
    def unread(self) -> int:
        """Inputs without a row (instances that could not be read)."""
        return self.inputs - self.answered


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


class ResultDelivery(Protocol):
    """Where ``cxr predict`` also delivers the answers once the run is over (the FHIR door:
    :class:`cxr.doors.fhir.FhirDelivery`)."""

    def deliver(self, rows: list[dict], files: Mapping[str, Path], audit: AuditLog | None, actor: str) -> Delivered:
        """Deliver the answered ``rows`` (``files``: each row's ``path`` -> its file), each delivery audited as
        ``actor``; what was not delivered."""


def run_predict(opts: PredictOptions, *, source: InputSource | None = None,
                delivery: ResultDelivery | None = None) -> PredictSummary:
    """Implementation of ``cxr predict`` (see ``cxr predict --help``): what was screened, as a summary that the
    command line turns into its last line and its exit status. ``source`` reads the inputs that are not files
    (``opts.dicomweb``: :meth:`PredictOptions.source`), ``delivery`` takes the answers after the run
    (``opts.fhir_out``, ``opts.fhir_url``: :meth:`PredictOptions.delivery`). Interrupted (SIGINT, SIGTERM), the rows
    done are saved and :class:`KeyboardInterrupt` goes on."""
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
                return PredictSummary(where=source.where, out=opts.out)
            rows, total, delivered_files = _run_streaming(opts, source, instances, folder, audit,
                                                          keep_headers=delivery is not None)
        else:
            paths = expand_inputs(opts.inputs)
            if not paths:
                return PredictSummary(out=opts.out)
            rows, total = screen_files(opts, paths, {}, audit), len(paths)
            delivered_files = {str(p): p for p in paths}
        sent = Delivered()
        if delivery is not None:
            sent = delivery.deliver(rows, delivered_files, audit, actor())
        counts = {s.value: sum(1 for r in rows if r["status"] == s.value) for s in contract.Status}
        return PredictSummary(inputs=total, answered=len(rows), ok=counts["ok"],
                              not_assessable=counts["not_assessable"], errors=counts["error"],
                              undelivered=sent.undelivered, retryable=sent.retryable,
                              where=source.where if source is not None else None, out=opts.out)


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
            with Screener(opts, rules, check_server=True) as screener:  # the server answers before anything is read
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
                            audit.event("received", actor=actor(), outcome="success" if name in got else "failure",
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
            emit(rows, opts.format, opts.out)
            print(f"interrupted: {len(rows)} of {len(names)} rows written", file=sys.stderr)
        raise
    finally:
        if journal is not None:
            journal.close()
    if journal is not None:
        assert opts.out is not None
        rows = materialise(journal, [Path(n) for n in names], opts.out)
        if audit is not None:
            audit.event("result_delivered", actor=actor(), destination="csv", rows=len(rows))
    else:
        emit(rows, opts.format, opts.out)
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


