"""The audit trail: who sent which study where, and what the AI said, answerable after the fact (ATNA in spirit).

An append-only file of JSON lines, one record per event. Each record carries its own sha256 (``hash``, over the
record without it) and the hash of the record before it (``prev``; the first carries 64 zeros), so editing,
inserting or deleting a line breaks the chain at that point, and :func:`verify` (``cxr audit-log verify FILE``)
says where. Records hold no names or other PHI: time, event, actor
(AE title, client certificate subject, page user or process), study and instance UIDs, the outcome, the model's
sha256, and numbers or codes in ``detail``. Writes go through :class:`cxr.core.durable.AppendOnlyLines`
(fsynced per record, one chain across threads and processes).

What a chain proves: a line changed or removed after it was written is detected, as is a removed tail when the
record count or last hash is kept elsewhere (``verify`` prints both, for a site to file). It does not stop an
attacker who can rewrite the whole file from recomputing the chain: ship the file (or its last hash) to a
write-once store for that.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.core.durable import AppendOnlyLines
from cxr.core.errors import CxrError, ExitCode

#: Events and what they mean.
EVENTS = {
    "received": "an image or study arrived (C-STORE, an upload, a file or a DICOMweb instance read)",
    "screened": "the model answered (ok or not_assessable) or the input failed (error)",
    "result_delivered": "a result left (SR or Secondary Capture by C-STORE or STOW-RS, FHIR, a CSV)",
    "delivery_failed": "a result could not be delivered (kept for a retry, or given up)",
    "model_changed": "the served model changed (a server started, or a model was loaded, unloaded or replaced)",
    "admin_api": "a restricted API was used (model control, repository, configuration)",
    "dropped": "an instance was accepted but not screened (not a SOP class, modality or body part screened)",
    "refused": "an association or a C-STORE was refused (calling or called AE title, an invalid request)",
    "started": "a component started",
    "stopped": "a component stopped",
}
OUTCOMES = ("success", "failure")
GENESIS = "0" * 64
#: Keys of ``detail`` that would carry PHI, refused outright.
PHI_KEYS = frozenset({"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "patient_name", "patient_id",
                      "birth_date", "name", "address", "AccessionNumber"})


class AuditChainError(CxrError):
    """The audit trail's chain is broken (a line edited, inserted, reordered or deleted) or unreadable."""

    exit_code = ExitCode.CHECK_FAILED


class AuditTrailUnreadable(AuditChainError):
    """The audit trail cannot be read at all (missing, unreadable, not text): nothing was checked."""

    exit_code = ExitCode.USAGE


def _canonical(rec: Mapping[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), default=str)


def record_hash(rec: Mapping[str, Any]) -> str:
    """sha256 of a record's canonical JSON without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in rec.items() if k != "hash"}).encode("utf-8")).hexdigest()


def default_actor() -> str:
    """This process, for events no remote party caused (``cxr serve`` on host H, pid P)."""
    return f"process:{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class AuditRecord:
    """One event.

    Attributes:
        event: A key of :data:`EVENTS`.
        actor: Who caused it: ``ae:CALLING_AE``, ``cert:SUBJECT``, ``user:NAME``, ``process:HOST:PID``.
        outcome: ``success`` or ``failure``.
        study_uid: Study Instance UID ('' when not DICOM).
        instance_uid: SOP Instance UID, or the input's name for a file that is not DICOM.
        model_sha256: sha256 of the model involved ('' when none).
        detail: Numbers and codes (status, rule, destination, probability ...); never a name.
    """

    event: str
    actor: str
    outcome: str = "success"
    study_uid: str = ""
    instance_uid: str = ""
    model_sha256: str = ""
    detail: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown audit event {self.event!r} (one of {', '.join(EVENTS)})")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if not self.actor:
            raise ValueError("an audit record needs its actor")
        bad = PHI_KEYS & set(self.detail or {})
        if bad:
            raise ValueError(f"audit detail must not carry patient data ({', '.join(sorted(bad))})")
        from cxr.core.security import redact_url

        if self.detail and "://" in _canonical(self.detail):  # no URL credentials in the trail
            object.__setattr__(self, "detail", json.loads(redact_url(_canonical(self.detail))))
        if "://" in self.actor:
            object.__setattr__(self, "actor", redact_url(self.actor))


class AuditLog:
    """Append records to a chained audit trail (created when missing; an existing chain is continued).

    Args:
        path: The JSON-lines file.
        component: What writes (``cxr predict``, ``cxr listen`` ...), recorded in every record.
    """

    def __init__(self, path: Path, *, component: str) -> None:
        self.path = Path(path)
        self.component = component
        self._lines = AppendOnlyLines(self.path)

    def record(self, rec: AuditRecord) -> dict:
        """Append one record; returns it as written (with ``seq``, ``time`` and ``prev``)."""
        def make(last: str | None) -> str:
            before = None if last is None else json.loads(last)
            prev = GENESIS if before is None else str(before.get("hash", ""))
            seq = 1 if before is None else int(before.get("seq", 0)) + 1
            out = {
                "seq": seq,
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                "component": self.component,
                "event": rec.event,
                "actor": rec.actor,
                "outcome": rec.outcome,
                "study_uid": rec.study_uid,
                "instance_uid": rec.instance_uid,
                "model_sha256": rec.model_sha256,
                "detail": dict(rec.detail or {}),
                "prev": prev,
            }
            out = json.loads(_canonical(out))  # as it will read back (numbers, strings)
            out["hash"] = record_hash(out)
            return _canonical(out)

        return json.loads(self._lines.append_with(make))

    def event(self, event: str, *, actor: str, outcome: str = "success", study_uid: str = "", instance_uid: str = "",
              model_sha256: str = "", **detail: Any) -> dict:
        """Shorthand for :meth:`record` of an :class:`AuditRecord`."""
        return self.record(AuditRecord(event, actor, outcome, study_uid, instance_uid, model_sha256, detail))

    def close(self) -> None:
        self._lines.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found.

    Attributes:
        ok: The whole chain holds.
        records: Records read (up to the first break).
        last_hash: The last good record's hash (file it elsewhere: a removed or rewritten tail is then detected too).
        broken_at: 1-based line number of the first line that breaks the chain (``None`` when ok).
        why: One line on the break.
    """

    ok: bool
    records: int
    last_hash: str
    broken_at: int | None = None
    why: str = ""


def verify(path: Path, *, expect_last_hash: str | None = None) -> Verification:
    """Walk the chain: every line must be JSON, carry the hash of the line before, and count up by one.

    Raises:
        AuditTrailUnreadable: The file cannot be read at all.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditTrailUnreadable(f"{path}: cannot read the audit trail ({type(exc).__name__})") from None
    prev, n = GENESIS, 0
    for i, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            return Verification(False, n, prev, i, f"line {i} is not a JSON record")
        if not isinstance(rec, dict) or rec.get("prev") != prev:
            return Verification(False, n, prev, i, f"line {i} does not carry the hash of line {i - 1} "
                                "(a line before it was edited, inserted or deleted)" if i > 1 else
                                "line 1 does not start the chain (the trail's first lines were deleted)")
        if rec.get("hash") != record_hash(rec):
            return Verification(False, n, prev, i, f"line {i} was edited (its content does not match its hash)")
        if rec.get("seq") != n + 1:
            return Verification(False, n, prev, i, f"line {i} has sequence number {rec.get('seq')}, expected {n + 1}")
        if rec.get("event") not in EVENTS:
            return Verification(False, n, prev, i, f"line {i} has an unknown event {rec.get('event')!r}")
        prev, n = str(rec["hash"]), n + 1
    if expect_last_hash is not None and prev != expect_last_hash:
        return Verification(False, n, prev, None, "the last record is not the one filed (the trail's tail was "
                            "removed or replaced)")
    return Verification(True, n, prev)


def read(path: Path) -> list[dict]:
    """The records of a verified trail.

    Raises:
        AuditChainError: The chain is broken.
    """
    v = verify(path)
    if not v.ok:
        raise AuditChainError(f"{path}: {v.why}")
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
