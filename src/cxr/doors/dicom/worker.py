"""The screening worker: takes the spool's instances in batches (urgent ones first, at Triton's urgent level),
screens them through the project's client, and turns each answer into its results (one per instance, or, with
``--study-quiet-s``, one per study once the study is quiet: :class:`StudyTracker`). An instance that cannot be
answered is set aside in ``dead-letter/`` with its reason, so that it never holds the queue."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.core import contract
from cxr.doors.dicom.config import ListenConfig
from cxr.doors.dicom.intake import is_uid
from cxr.doors.dicom.results import Film, ResultBuilder
from cxr.doors.dicom.spool import Spool
from cxr.doors.dicom.telemetry import Telemetry

if TYPE_CHECKING:
    from cxr.client import PneumoniaClient, Prediction

logger = logging.getLogger(__name__)


class Unanswerable(Exception):
    """An instance no result can be made for (set aside with ``why``, a code, and the message, a reason)."""

    def __init__(self, why: str, reason: str, study: str = "") -> None:
        super().__init__(reason)
        self.why = why
        self.study = study


class StudyTracker:
    """One result per study: which studies still have instances to screen and when each last got one (the SCP
    notes arrivals, the worker notes screened instances; both from their own threads)."""

    def __init__(self, quiet_s: float | None) -> None:
        self.quiet_s = quiet_s
        self._unscreened: dict[str, set[str]] = {}  # study -> instances received, not yet screened
        self._arrived: dict[str, float] = {}  # study -> time of its last arrival
        self._lock = threading.Lock()

    def arrived(self, study: str, uid: str) -> None:
        if self.quiet_s is not None and study:
            with self._lock:
                self._unscreened.setdefault(study, set()).add(uid)
                self._arrived[study] = time.time()

    def screened(self, uid: str) -> None:
        with self._lock:
            for study, uids in list(self._unscreened.items()):
                uids.discard(uid)
                if not uids:
                    del self._unscreened[study]

    def state(self, study: str) -> tuple[bool, float]:
        """(instances of the study still to screen, time of its last arrival or 0)."""
        with self._lock:
            return bool(self._unscreened.get(study)), self._arrived.get(study, 0.0)

    def closed(self, study: str) -> None:
        with self._lock:
            self._arrived.pop(study, None)


class ScreeningWorker:
    """The one screening thread (:meth:`run`); :meth:`wake` when the spool got something."""

    #: Tries of an instance whose screening raises before it is set aside.
    MAX_SCREEN_FAILURES = 3
    #: How often the spool's markers older than the retention period are removed.
    PRUNE_EVERY_S = 3600.0

    def __init__(self, cfg: ListenConfig, spool: Spool, results: ResultBuilder, telemetry: Telemetry,
                 studies: StudyTracker, stop: threading.Event, on_results: Callable[[], None]) -> None:
        self.cfg = cfg
        self.spool = spool
        self.results = results
        self.telemetry = telemetry
        self.studies = studies
        self._stop = stop
        self._on_results = on_results  # results are in the outboxes: wake the senders
        self._wake = threading.Event()
        self._failures: dict[str, int] = {}
        self._client: PneumoniaClient | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self, client: PneumoniaClient) -> None:
        """Screen until stopped: whatever the spool holds, then each new arrival."""
        self._client = client
        backoff = 0.5
        quiet = self.cfg.study_quiet_s
        tick = 2.0 if quiet is None else min(2.0, max(0.1, quiet / 4))
        pruned = float("-inf")
        while not self._stop.is_set():
            if time.monotonic() - pruned >= self.PRUNE_EVERY_S:
                pruned = time.monotonic()
                self._prune()
            self._wake.wait(timeout=tick)
            self._wake.clear()
            while not self._stop.is_set():
                self._close_studies()
                files = self.spool.pending()[: self.cfg.batch]
                if not files:
                    break
                try:
                    progressed = self._screen(files)
                except Exception:  # noqa: BLE001 - the worker must survive; the files stay in the spool
                    logger.exception("screening a batch of %d failed; screening them one by one", len(files))
                    progressed = self._screen_one_by_one(files)
                if not progressed:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    break
                backoff = 0.5

    def _prune(self) -> None:
        """Done and delivered markers (and answered studies) older than ``--retention-days`` away."""
        try:
            n = self.spool.prune(self.cfg.retention_days * 86400)
        except OSError as exc:  # a spool that cannot be pruned now is pruned next time
            logger.warning("pruning the spool failed: %s", exc)
            return
        if n:
            logger.info("%d markers older than %g days removed from the spool", n, self.cfg.retention_days)

    def _screen_one_by_one(self, files: list[Path]) -> bool:
        """After a batch raised: each instance alone; one that raises :attr:`MAX_SCREEN_FAILURES` times is set
        aside, so that it never holds the queue."""
        progressed = False
        for f in files:
            if self._stop.is_set():
                break
            try:
                progressed |= self._screen([f])
            except Exception as exc:  # noqa: BLE001
                n = self._failures.get(f.stem, 0) + 1
                self._failures[f.stem] = n
                if n >= self.MAX_SCREEN_FAILURES:
                    self._set_aside(f.stem, "screening_failed", f"screening raised {n} times: {type(exc).__name__}: "
                                    f"{str(exc)[:200]}")
                    progressed = True
        return progressed

    def _set_aside(self, uid: str, why: str, reason: str, study: str = "") -> None:
        """An instance that cannot be answered: out of the queue into ``dead-letter/`` with its reason, audited,
        counted."""
        # the reason names the file where it is now (dead-letter/), not where it was read (incoming/)
        reason = reason.replace(str(self.spool.incoming / f"{uid}.dcm"), str(self.spool.dead_letter / f"{uid}.dcm"))
        self.spool.set_aside(uid, reason)
        self._failures.pop(uid, None)
        self.studies.screened(uid)
        self.telemetry.count("set_aside")
        self.telemetry.metric("set_aside", why=why)
        self.telemetry.event("screened", outcome="failure", study_uid=study, instance_uid=uid, status="set_aside",
                             why=why)
        logger.error("instance %s set aside: %s (the file is now %s, its reason beside it in %s.why)", uid, reason,
                     self.spool.dead_letter / f"{uid}.dcm", uid)

    def _screen(self, files: list[Path]) -> bool:
        """Screen a batch (its urgent instances first, at the urgent level); ``True`` when at least one instance
        reached a final state. An instance screened before a crash (its ``screened/`` record) is finished from
        that record, never screened again."""
        assert self._client is not None
        progressed = False
        fresh = []
        for f in files:
            record = self.spool.screened_record(f.stem)
            if record is None:
                fresh.append(f)
                continue
            from cxr.doors.dicom.study import from_json

            progressed |= self._finish([f], [from_json(record["answer"])], str(record.get("priority", "routine")),
                                       record)
        urgent = [f for f in fresh if self.spool.is_urgent(f)]
        routine = [f for f in fresh if f not in set(urgent)]
        for group, priority in ((urgent, "urgent"), (routine, "routine")):
            if group:
                preds = self._client.predict([str(f) for f in group], priority=priority)
                progressed |= self._finish(group, preds, priority)
        if progressed:
            self._on_results()
        return progressed

    def _finish(self, files: list[Path], preds: list[Prediction], priority: str, record: dict | None = None) -> bool:
        progressed = False
        for f, pred in zip(files, preds):
            uid = f.stem
            if pred.status is contract.Status.ERROR and pred.retryable:
                logger.warning("instance %s: transient failure, kept for a retry", uid)
                continue
            try:
                self._finish_one(f, pred, priority, record)
            except Unanswerable as exc:
                self._set_aside(uid, exc.why, str(exc), exc.study)
            except Exception as exc:  # noqa: BLE001 - one instance's failure must not hold the others
                self._set_aside(uid, "result_failed", f"making its result failed: {type(exc).__name__}: "
                                f"{str(exc)[:200]}")
            progressed = True
        return progressed

    @staticmethod
    def key(uid: str, pred: Prediction) -> list[str]:
        """A result's key: (SOP Instance UID, model sha256, operating point)."""
        return [uid, pred.model_sha256, pred.operating_point or ""]

    def _finish_one(self, f: Path, pred: Prediction, priority: str, record: dict | None = None) -> None:
        """Finish one screened instance, each step once per key however often a crash interrupts it: the answer
        recorded (``screened/``), its CSV row, its ``screened`` audit record, its results in the outboxes, its done
        marker. A step done before a crash is recognised on the rerun (the row and the audit record by their key,
        an outbox result by its name, which derives from the key) and not done again."""
        import datetime as dt

        import pydicom

        uid = f.stem
        source = None
        study = ""
        if pred.status is not contract.Status.ERROR:
            source = pydicom.dcmread(f, stop_before_pixels=True)
            study = str(source.get("StudyInstanceUID", "") or "")
            if not is_uid(study):
                raise Unanswerable("no_study_uid", "no valid Study Instance UID: a result cannot be filed in its "
                                   "study")
        if record is None:
            from cxr.doors.dicom.study import to_json

            record = {"key": self.key(uid, pred), "study_uid": study, "priority": priority,
                      "screened_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
                      "answer": to_json(pred)}
            self.spool.record_screened(uid, record)
        at = dt.datetime.fromisoformat(str(record["screened_at"]))
        key = [str(k) for k in record["key"]]
        results: list[tuple[str, str, bytes]] = []
        if source is not None and self.cfg.study_quiet_s is None:  # made first: one that cannot be made has no row
            results = self.results.for_instance(f, pred, source, at=at)
        self.results.row(f, pred)
        self.telemetry.observe(pred, manufacturer=str(getattr(source, "Manufacturer", "") or "")[:64],
                               station=str(getattr(source, "StationName", "") or "")[:64])
        if pred.status is contract.Status.ERROR:  # unreadable: an error row, and the file set aside, visibly
            raise Unanswerable("unreadable", f"unreadable: {pred.reason}")
        self.telemetry.event_once("screened", key, outcome="success", study_uid=study, instance_uid=uid,
                                  model_sha256=pred.model_sha256, status=pred.status.value, rule=pred.rule,
                                  probability=pred.probability, priority=priority,
                                  operating_point=pred.operating_point or None)
        if self.cfg.study_quiet_s is not None:  # answered with its study, once the study is quiet
            import json

            from cxr.doors.dicom.study import to_json

            self.spool.hold(study, uid, json.dumps({**to_json(pred), "screened_at": record["screened_at"]}).encode(),
                            urgent=priority == "urgent")
            self.studies.screened(uid)
        else:
            self.spool.finish(uid, results, urgent=priority == "urgent")
        self._failures.pop(uid, None)
        self.telemetry.count("screened")
        logger.info("instance %s: %s%s", uid, pred.status.value, f" ({pred.label})" if pred.label else "")

    # -- one result per study -----------------------------------------------------------------------------------
    def _close_studies(self) -> None:
        """Answer every study that has been quiet for ``study_quiet_s`` and has nothing left to screen."""
        quiet = self.cfg.study_quiet_s
        if quiet is None or not self.spool.studies.is_dir():
            return
        for folder in sorted(self.spool.studies.iterdir()):
            if self._stop.is_set():
                return
            answers = list(folder.glob("*.json"))
            busy, last = self.studies.state(folder.name)
            try:
                last = max([last, *(a.stat().st_mtime for a in answers)])
            except FileNotFoundError:
                continue
            if busy or not answers or time.time() - last < quiet:
                continue
            try:
                self._close_study(folder)
            except Exception as exc:  # noqa: BLE001 - one study's failure must not hold the others
                for a in answers:
                    uid, film = a.stem, folder / f"{a.stem}.dcm"
                    if film.exists():
                        film.replace(self.spool.incoming / f"{uid}.dcm")  # set aside from there, with its reason
                    a.unlink(missing_ok=True)
                    self._set_aside(uid, "study_result_failed", f"making its study's result failed: "
                                    f"{type(exc).__name__}: {str(exc)[:200]}", folder.name)
                import shutil

                shutil.rmtree(folder, ignore_errors=True)
            self.studies.closed(folder.name)
        self._on_results()

    def _close_study(self, folder: Path) -> None:
        """Answer a quiet study. A study answered before (``answered/``) is answered again over all its films,
        the earlier ones and the new: the new SR names the earlier one as its predecessor and takes the next
        Instance Number, the FHIR DiagnosticReport is updated in place (``amended``)."""
        import datetime as dt
        import json

        import pydicom

        from cxr.doors.dicom.results import encode
        from cxr.doors.dicom.study import combine, from_json

        new = {a.stem for a in folder.glob("*.json")}
        earlier, report = self.spool.study_answered(folder.name)
        if report is not None and new <= set(report["films"]):  # answered with them before a crash: clean up only
            self.spool.finish_study(folder, sorted(new), [])
            return
        films: list[Film] = []
        times = []
        keep: dict[str, tuple[bytes, bytes]] = {}
        answers = [(uid, answer, hdr) for uid, answer, hdr in earlier if uid not in new]
        answers += [(a.stem, json.loads(a.read_text()), folder / f"{a.stem}.dcm") for a in sorted(folder.glob("*.json"))]
        for uid, answer, film in answers:
            if answer.get("screened_at"):
                times.append(dt.datetime.fromisoformat(str(answer["screened_at"])))
            header = pydicom.dcmread(film, stop_before_pixels=True)
            films.append((uid, from_json({k: v for k, v in answer.items() if k != "screened_at"}), header, film))
            if uid in new:  # kept without its pixels, in an uncompressed syntax, for an amendment
                copy = pydicom.dcmread(film, stop_before_pixels=True)
                copy.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
                keep[uid] = (json.dumps(answer).encode(), encode(copy))
        # films in the order they were taken (Instance Number), then by UID
        films.sort(key=lambda it: (int(it[2].get("InstanceNumber", 0) or 0), it[0]))
        study = combine([(uid, pred) for uid, pred, _, _ in films])
        version = int(report["version"]) + 1 if report is not None else 1
        results, sr = self.results.for_study(films, study, at=max(times, default=None), version=version,
                                             predecessor=report["sr"] if report is not None else None, new=new)
        model = films[0][1]
        # once per key: the study, the model and the films answered (which make the study SR's UID)
        self.telemetry.event_once("screened", ["study", folder.name, model.model_sha256,
                                               *sorted(uid for uid, *_ in films)],
                                  study_uid=folder.name, model_sha256=model.model_sha256, level="study",
                                  status=study.status.value, label=study.label, probability=study.probability,
                                  instances=len(films), frontal=len(study.frontal), why=study.why or None,
                                  version=version, amends=report["sr"]["sop_instance_uid"] if report else None)
        self.spool.finish_study(folder, sorted(new), results, keep=keep, report={
            "version": version, "films": sorted(uid for uid, *_ in films), "sr": sr})
        logger.info("study %s: %s%s from %d film(s), %d frontal%s", folder.name, study.status.value,
                    f" ({study.label})" if study.label else "", len(films), len(study.frontal),
                    f"; amends its result (version {version})" if version > 1 else "")
