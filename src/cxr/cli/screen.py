"""Screening: films in, answers out (``predict``; ``listen``, the DICOM door; ``ui``, the page, and its users)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.cli import options
from cxr.core import contract
from cxr.core.errors import CxrError
from cxr.core.lifecycle import serve_until_signal
from cxr.core.paths import DEFAULT_MODEL, DEFAULT_REPOSITORY, DEFAULT_SPOOL, EARLIER_SPOOL, KNOWN_SPOOLS, REPO_ROOT
from cxr.core.security import check_url, redact_url

if TYPE_CHECKING:
    from cxr.doors.predict import PredictSummary

TITLE = "screening: films in, answers out"

logger = logging.getLogger(__name__)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files or folders",
        description="Classify JPEG/PNG/DICOM files (folders are walked). Every input gets exactly one answer: "
        "status ok (label Normal/Pneumonia and P(pneumonia)), not_assessable (no label; the reason names the "
        "rule: DICOM header, blank, colour, aspect ratio, or out of distribution) or error (a one-line reason). "
        "Exit code 0 when every input has an answer that is not an error, 1 otherwise. With --format csv "
        "--out results.csv, each chunk is journaled durably beside the CSV; a rerun retries transient "
        "failures (server unavailable, deadline, overload, server error) and changed files, keeps final "
        "answers, and rewrites the CSV atomically with one row per input. With --dicomweb the inputs are the "
        "instances of the studies a DICOMweb server finds (QIDO-RS, then WADO-RS), and the CSV's path is each "
        "instance's SOP Instance UID. --fhir-out/--fhir-url give the EHR a DiagnosticReport and an Observation per "
        "answered input; --priority urgent sends ahead of routine work; --audit-log records every event.",
    )
    p.add_argument("inputs", nargs="*", type=Path, help="files or folders (none with --dicomweb)")
    options.add_client_args(p)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="table (people), json or csv (pipelines)")
    p.add_argument("--out", type=Path, help="write results here (csv: resumable, one row per input)")
    p.add_argument("--chunk", type=int, default=64, help="images preprocessed, sent and journaled per step")
    p.add_argument("--eligibility", type=Path, help="DICOM eligibility rules file (default: the served model's)")
    p.add_argument("--retries", type=int, default=6, help="tries per request before its images are left for a rerun")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on a Ray cluster (host:port, or auto): preprocessing as CPU tasks, inference in an actor "
                   "pool (the --url fleet, or embedded onnxruntime); needs the ray extra and shared input paths")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics of the answers on --metrics-host:PORT while the run lasts")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                   help="address the metrics are served on (loopback by default)")
    p.add_argument("--metrics-file", type=Path, help="write the metrics (Prometheus text format) here after every chunk")
    p.add_argument("--dicomweb", metavar="URL",
                   help="read the inputs from this DICOMweb root (e.g. http://127.0.0.1:8042/dicom-web): QIDO-RS finds "
                   "the studies, WADO-RS reads every instance")
    p.add_argument("--study", action="append", default=[], metavar="UID",
                   help="with --dicomweb: screen this study (Study Instance UID; repeatable)")
    p.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                   help="with --dicomweb: a QIDO-RS study filter, e.g. ModalitiesInStudy=DX or StudyDate=20261201- "
                   "(repeatable)")
    options.add_result_doors(p)
    p.add_argument("--patient-id-system", metavar="URI",
                   help="the site's patient identifier system (its MRN system, e.g. urn:oid:1.2.3 or "
                   "https://hospital.example/mrn) for FHIR subjects; a header's IssuerOfPatientID that names a "
                   "system (an OID or a URI) wins")
    p.add_argument("--priority", choices=sorted(contract.PRIORITIES), default=contract.DEFAULT_PRIORITY,
                   help="Triton priority level of the requests: urgent is batched before routine work")
    options.add_operating_point(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(a: argparse.Namespace) -> int:
    from cxr.doors.predict import PredictOptions, run_predict

    if a.priority != contract.DEFAULT_PRIORITY and a.protocol == "embedded":  # the library ignores it there
        raise CxrError(f"--priority {a.priority} orders requests in Triton's queue; --protocol embedded has no "
                       "queue: drop --priority or use --protocol grpc/http")
    try:
        opts = PredictOptions(inputs=tuple(a.inputs), url=a.url, protocol=a.protocol, model=a.model,
                              timeout_s=a.timeout_s, format=a.format, out=a.out, chunk=a.chunk,
                              eligibility=a.eligibility, retries=a.retries, ray=a.ray,
                              metrics_port=a.metrics_port, metrics_host=a.metrics_host,
                              metrics_file=a.metrics_file,
                              dicomweb=a.dicomweb, studies=tuple(a.study), query=tuple(a.query),
                              priority=a.priority, fhir_out=a.fhir_out, fhir_url=a.fhir_url,
                              audit_log=a.audit_log, operating_point=a.operating_point,
                              **options.client_security(a))
    except ValueError as exc:
        raise CxrError(f"--{str(exc)}" if str(exc).startswith(("chunk", "retries")) else str(exc)) from None
    if a.patient_id_system and a.fhir_url is None and a.fhir_out is None:
        raise CxrError("--patient-id-system names the patients of FHIR results: give --fhir-url or --fhir-out too")
    from cxr.doors.dicom.study import combine

    try:  # a study's films make one DiagnosticReport, by the listener's rule
        delivery = opts.delivery(patient_id_system=a.patient_id_system, study_rule=combine)
        source = opts.source()
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    return predict_exit_status(run_predict(opts, source=source, delivery=delivery))


def predict_exit_status(s: PredictSummary) -> int:
    """A run's summary (:class:`cxr.doors.predict.PredictSummary`) in one line, and its exit status: 0 when every
    input has an answer that is not an error (``not_assessable`` is an answer) and every result was delivered (or a
    query matched nothing); 1 when an input has an error or no result, or a result was refused; 75 when results
    remain undelivered for now (EX_TEMPFAIL: a rerun delivers them); 2 when no input file was found."""
    from cxr.core.errors import ExitCode

    if not s.inputs:
        if s.where is not None:  # a quiet night is no failure for a cron job
            print(f"cxr predict: nothing to screen: no instance matches on {s.where}", file=sys.stderr)
            return ExitCode.OK
        print("cxr predict: no input files found", file=sys.stderr)
        return ExitCode.USAGE
    print(f"{s.answered} of {s.inputs} inputs answered: {s.ok} ok, {s.not_assessable} not assessable, {s.errors} errors"
          + (f", {s.unread} without a result" if s.unread else "")
          + (f", {s.undelivered} results not delivered" + (" (rerun to deliver them)" if s.retryable else "")
             if s.undelivered else "")
          + (f" (written to {s.out})" if s.out else ""), file=sys.stderr)
    if s.errors or s.unread or (s.undelivered and not s.retryable):
        return ExitCode.INTERNAL  # 1: the table's "cxr predict: some input's answer is an error"
    return ExitCode.TEMPFAIL if s.undelivered else ExitCode.OK


def _add_listen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "listen",
        help="DICOM Storage SCP: screen what a PACS or modality sends, send DICOM SR results back",
        description="Answer C-ECHO and C-STORE. CR, DX for presentation and for processing, and Secondary Capture are "
        "screened (--screen-*); every other instance is accepted with C-STORE success (status 0x0000, so a PACS "
        "routing a whole study goes on), counted, audited and dropped. Each instance is written to the spool and fsynced before "
        "C-STORE answers success, screened asynchronously (eligibility rules and not_assessable as everywhere), "
        "and its result goes back to --send-to as a Comprehensive SR in the source's study (with --heatmap, a "
        "Secondary Capture of the Grad-CAM overlay too). Results that cannot be delivered stay queued across "
        "restarts and are retried with backoff; result UIDs derive from the source UID and the model's sha256, "
        "so a resend never duplicates. On start, whatever the spool holds is finished. Ctrl-C or SIGTERM stops. "
        "Results can also (or instead) go by STOW-RS (--stow-url) and to the EHR as FHIR (--fhir-url, --fhir-out); "
        "urgent studies (Requested Procedure Priority STAT/HIGH, or --urgent-if) are screened first at Triton's "
        "urgent level; --audit-log records every event.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port")
    p.add_argument("--ae-title", default="CXR_AI", help="this listener's AE title")
    p.add_argument("--send-to", help="where results go: AET@HOST:PORT (the PACS)")
    p.add_argument("--allow", action="append", default=[], metavar="AET",
                   help="accept associations only from this calling AE title (repeatable; default: any)")
    p.add_argument("--spool", type=Path, default=DEFAULT_SPOOL,
                   help=f"durable state folder (default {DEFAULT_SPOOL}: $CXR_HOME/listen-spool when set)")
    p.add_argument("--out", type=Path, help="results CSV (the columns of cxr predict, with the SOP Instance UID)")
    p.add_argument("--heatmap", action="store_true", help="also send the Grad-CAM overlay for Pneumonia answers")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="for --heatmap")
    p.add_argument("--url", help="inference server host:port, or the repository for embedded (the default)")
    p.add_argument("--protocol", choices=["grpc", "http", "embedded"], default="embedded",
                   help="how to reach the model: embedded (in-process, the default), grpc or http")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    options.add_tls_client_args(p)
    g = p.add_argument_group("DICOM TLS")
    g.add_argument("--dicom-tls-cert", type=Path, help="this listener's certificate: incoming associations use TLS")
    g.add_argument("--dicom-tls-key", type=Path, help="its private key")
    g.add_argument("--dicom-tls-client-ca", type=Path, help="require calling nodes' certificates from this CA (mutual)")
    g.add_argument("--send-tls-ca", type=Path, help="CA of the PACS's certificate: results are sent over TLS")
    g.add_argument("--send-tls-cert", type=Path, help="this listener's client certificate for the PACS (mutual)")
    g.add_argument("--send-tls-key", type=Path, help="its private key")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics of the answers (by status, rule, Manufacturer/StationName; "
                   "ood_score and probability histograms; the pipeline's counters) on --metrics-host:PORT")
    p.add_argument("--patient-id-system", metavar="URI",
                   help="the site's patient identifier system (its MRN system) for the FHIR results' subjects; a "
                   "header's IssuerOfPatientID that names a system (an OID or a URI) wins")
    p.add_argument("--retention-days", type=float, default=30.0, metavar="DAYS",
                   help="keep the spool's done and delivered markers (and what answered studies were answered with) "
                   "this long, then remove them (default 30)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                   help="address the metrics are served on (loopback by default; this host's address, or 0.0.0.0, "
                   "for a Prometheus on another host)")
    p.add_argument("--stow-url", metavar="URL",
                   help="store the SR (and Secondary Capture) with STOW-RS at this DICOMweb root, instead of or "
                   "beside --send-to")
    p.add_argument("--urgent-if", action="append", default=[], metavar="KEYWORD=VALUE[,VALUE]",
                   help="a site rule making a study urgent, e.g. InstitutionalDepartmentName=Emergency (repeatable; "
                   "Requested Procedure Priority STAT or HIGH is urgent anyway)")
    g = p.add_argument_group("what is screened (the rest is accepted with C-STORE success, counted, audited and dropped)")
    g.add_argument("--screen-sop-class", action="append", default=[], metavar="UID",
                   help="a SOP class screened (repeatable; default: CR, DX for presentation and for processing, "
                   "Secondary Capture)")
    g.add_argument("--screen-modality", action="append", default=[], metavar="MODALITY",
                   help="screen only this Modality, e.g. DX (repeatable; default: any)")
    g.add_argument("--screen-body-part", action="append", default=[], metavar="PART",
                   help="screen only this Body Part Examined, e.g. CHEST (repeatable; an instance without one is "
                   "screened; default: any)")
    g = p.add_argument_group("authentication of --stow-url and --fhir-url")
    g.add_argument("--web-token-file", type=Path, metavar="FILE",
                   help="a bearer token (one line, file mode 600) sent as Authorization: Bearer")
    g.add_argument("--web-tls-cert", type=Path, help="this listener's client certificate (mutual TLS)")
    g.add_argument("--web-tls-key", type=Path, help="its private key")
    g.add_argument("--web-tls-ca", type=Path, help="CA bundle the servers' certificates must verify against")
    p.add_argument("--study-quiet-s", type=float, metavar="SECONDS",
                   help="one result per study: answer a study once nothing of it arrived for SECONDS (e.g. 30); its "
                   "frontal films are combined (any Pneumonia -> Pneumonia; all not assessable -> not assessable), "
                   "laterals make no result of their own (default: one result per instance)")
    p.add_argument("--redeliver", action="store_true",
                   help="on start, put the results a destination refused for good (dead-letter-*/) back in their "
                   "outboxes")
    options.add_result_doors(p)
    options.add_operating_point(p)
    p.set_defaults(func=_cmd_listen)


def _cmd_listen(a: argparse.Namespace) -> int:
    from cxr.core.security import HttpAuth, TlsClient, TlsServer
    from cxr.doors.dicom.config import Destination, ListenConfig
    from cxr.doors.dicom.intake import ScreenFilter, UrgentRule
    from cxr.doors.dicom.listener import Listener

    try:
        dicom_tls = TlsServer(a.dicom_tls_cert, a.dicom_tls_key, a.dicom_tls_client_ca) if a.dicom_tls_cert else None
        send_tls = TlsClient(a.send_tls_ca, a.send_tls_cert, a.send_tls_key) if a.send_tls_ca else None
        cfg = ListenConfig(spool=a.spool, host=a.host, port=a.port, ae_title=a.ae_title,
                           send_to=Destination.parse(a.send_to) if a.send_to else None, allow=tuple(a.allow),
                           out=a.out, url=a.url, protocol=a.protocol, model=a.model, heatmap=a.heatmap,
                           repository=a.model_repository, dicom_tls=dicom_tls, send_tls=send_tls,
                           metrics_port=a.metrics_port, metrics_host=a.metrics_host, stow_url=a.stow_url,
                           fhir_url=a.fhir_url,
                           fhir_out=a.fhir_out, audit_log=a.audit_log, patient_id_system=a.patient_id_system,
                           retention_days=a.retention_days,
                           urgent_if=tuple(UrgentRule.parse(t) for t in a.urgent_if), redeliver=a.redeliver,
                           study_quiet_s=a.study_quiet_s, operating_point=a.operating_point,
                           web_auth=HttpAuth.of(a.web_token_file, a.web_tls_cert, a.web_tls_key, a.web_tls_ca), screen=ScreenFilter.of(tuple(a.screen_sop_class), tuple(a.screen_modality),
                                                  tuple(a.screen_body_part)), **options.client_security(a))
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    check_url(a.stow_url, "--stow-url")
    check_url(a.fhir_url, "--fhir-url")
    for line in spool_warnings(cfg.spool):
        print(f"cxr listen: warning: {line}", file=sys.stderr, flush=True)
    remember_spool(cfg.spool)

    with Listener(cfg) as listener:
        where = [redact_url(w) for w in (a.send_to, a.stow_url and f"STOW-RS {a.stow_url}",
                                         a.fhir_url and f"FHIR {a.fhir_url}") if w]
        print(f"listening: {cfg.ae_title}@{cfg.host}:{cfg.port}" + (f", results to {', '.join(where)}" if where else
              ", results kept in the outbox (no --send-to)") + f"; spool {cfg.spool}; Ctrl-C to stop", flush=True)
        if listener.metrics_port is not None:
            host = f"[{cfg.metrics_host}]" if ":" in cfg.metrics_host else cfg.metrics_host
            print(f"metrics on http://{host}:{listener.metrics_port}/metrics", flush=True)
        serve_until_signal()
    return 0


def unfinished_work(spool: Path) -> int:
    """Instances and results a listener's spool still holds: waiting to be screened, held for their study, or
    waiting to be delivered (its layout: :mod:`cxr.doors.dicom`)."""
    from cxr.doors.dicom.spool import Spool

    def files(folder: Path, pattern: str = "*") -> int:
        return sum(1 for f in folder.rglob(pattern) if f.is_file() and not f.name.startswith("."))

    return (files(spool / "incoming", "*.dcm") + files(spool / "studies")
            + sum(files(spool / box) for box in Spool.OUTBOXES.values()))


def spool_warnings(spool: Path) -> list[str]:
    """For a listener about to start on an empty (or new) spool: one line for each other spool it was started on
    before (or the earlier default, out/listen-spool) that still holds unfinished work, naming it."""
    spool = Path(spool).absolute()
    if spool.exists() and any(spool.iterdir()):
        return []
    candidates = [Path.cwd() / EARLIER_SPOOL, REPO_ROOT / EARLIER_SPOOL]
    try:
        candidates += [Path(line) for line in KNOWN_SPOOLS.read_text().splitlines() if line.strip()]
    except OSError:
        pass
    lines, seen = [], {spool.resolve()}
    for other in candidates:
        if other.resolve() in seen or not other.is_dir():
            continue
        seen.add(other.resolve())
        n = unfinished_work(other)
        if n:
            lines.append(f"{other} holds {n} unfinished instances or results from an earlier listener; this one "
                         f"starts on the empty spool {spool}: restart with --spool {other} to finish them")
    return lines


def remember_spool(spool: Path) -> None:
    """Add ``spool`` to the state folder's list of spools (:data:`cxr.core.paths.KNOWN_SPOOLS`)."""
    spool = Path(spool).absolute()
    try:
        known = KNOWN_SPOOLS.read_text().splitlines() if KNOWN_SPOOLS.exists() else []
        if str(spool) not in known:
            KNOWN_SPOOLS.parent.mkdir(parents=True, exist_ok=True)
            with KNOWN_SPOOLS.open("a") as f:
                f.write(f"{spool}\n")
    except OSError as exc:  # the list only serves the warning above
        logger.warning("cannot record the spool in %s: %s", KNOWN_SPOOLS, exc)


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="the Gradio screening page (Pneumonia Detection using Chest X-Ray)",
        description="Drop or upload X-rays, Submit, read Normal/Pneumonia with P(pneumonia), threshold and model "
        "version, or Not assessable with the reason; a Pneumonia answer gets a Grad-CAM heatmap over the whole "
        "film (when the local model file is the served one); several images give a table with a CSV download. Predictions go "
        "through the project client (the running Triton over gRPC by default). Binds 127.0.0.1; no public "
        "share link unless --share; uploads are deleted after each response.",
    )
    options.add_client_args(p)
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="for the Grad-CAM files")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default; see the README before changing it)")
    p.add_argument("--port", type=int, default=7860, help="port of the page")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    p.add_argument("--max-file-mb", type=int, default=32, help="upload size limit per file")
    g = p.add_argument_group("access")
    g.add_argument("--auth-file", type=Path, help="credentials file (cxr ui-passwd): the page asks for a login")
    g.add_argument("--https-cert", type=Path, help="certificate for HTTPS (with --https-key)")
    g.add_argument("--https-key", type=Path, help="private key for HTTPS")
    p.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="append each upload and answer (the signed-in user, the file's sha256) to this hash-chained "
                   "audit trail")
    options.add_operating_point(p)
    p.set_defaults(func=_cmd_ui)


def _cmd_ui(a: argparse.Namespace) -> int:
    from cxr.ui import UiConfig, launch

    try:
        cfg = UiConfig(url=a.url, protocol=a.protocol, model=a.model, repository=a.model_repository, host=a.host,
                       port=a.port, share=a.share, max_file_mb=a.max_file_mb, auth_file=a.auth_file,
                       https_cert=a.https_cert, https_key=a.https_key, audit_log=a.audit_log,
                       operating_point=a.operating_point, **options.client_security(a))
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    launch(cfg)
    return 0


def _add_ui_passwd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui-passwd",
        help="add or replace a user in the screening page's credentials file",
        description="Read a password (twice, without echo; or one line from standard input when it is not a "
        "terminal) and write USER:scrypt$salt$hash into FILE, created with mode 600. Plain-text passwords never "
        "touch the disk. Use the file with `cxr ui --auth-file FILE`.",
    )
    p.add_argument("file", type=Path, help="credentials file")
    p.add_argument("user", help="user name (letters, digits, '.', '_' or '-')")
    p.set_defaults(func=_cmd_ui_passwd)


def _cmd_ui_passwd(a: argparse.Namespace) -> int:
    import getpass

    from cxr.ui import set_password

    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            raise CxrError("the passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\n")
    set_password(a.file, a.user, pw)
    print(f"{a.user} written to {a.file}")
    return 0


COMMANDS = [_add_predict, _add_listen, _add_ui, _add_ui_passwd]
