"""What a hospital may expect of a model: ``claims.json``, the one home of its stated figures.

Every figure a hospital reads (the README's and the card's performance tables, the site model's go) is a
:class:`Claim`: one source's test patients at one named operating point, with 95% intervals that resample
patients, not films. A claim measured on patients that also chose something (a checkpoint, a threshold, a
calibration) is ``in_sample`` and says so wherever it appears.

The file::

    {"model_sha256": "...", "method": "...", "confidence": 0.95, "generated_by": "cxr claims ...",
     "claims": [{"source": "nih", "population": "adult", "operating_point": "adult", "threshold": 0.31,
                 "in_sample": false, "films": 71, "patients": 60, "positives": 15, "negatives": 56,
                 "auc": [0.91, 0.83, 0.97], "sensitivity": [...], "specificity": [...], "flagged": [...]}]}

A metric a set cannot measure (AUC or specificity of a one-class source) is ``null``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.core.errors import CxrError

CLAIMS_FILE = "claims.json"
#: The metrics a claim carries, each ``[point, lower, upper]`` or ``null``.
METRICS = ("auc", "sensitivity", "specificity", "flagged")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class Interval:
    """A rate with its confidence interval: ``lower <= point <= upper``, all in [0, 1]."""

    point: float
    lower: float
    upper: float

    def __post_init__(self) -> None:
        for v in (self.point, self.lower, self.upper):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"interval values must be in [0, 1], got {self.as_list()}")
        if not self.lower - 1e-12 <= self.point <= self.upper + 1e-12:
            raise ValueError(f"interval must hold its point: {self.as_list()}")

    def as_list(self) -> list[float]:
        return [float(self.point), float(self.lower), float(self.upper)]

    @classmethod
    def parse(cls, value: Any) -> Interval | None:
        if value is None:
            return None
        if not (isinstance(value, Sequence) and len(value) == 3):
            raise ValueError(f"an interval is [point, lower, upper], got {value!r}")
        return cls(float(value[0]), float(value[1]), float(value[2]))


@dataclass(frozen=True)
class Claim:
    """One source's test patients at one operating point.

    Attributes:
        source: The source (``kaggle``, ``nih``, ``covid``, a site name).
        population: Who the films are (``pediatric``, ``adult``).
        operating_point: The named operating point that answered.
        threshold: Its threshold on ``probability``.
        in_sample: True when these patients also chose something (never for a locked test set).
        films, patients, positives, negatives: What was measured (refused films count as referrals).
        auc, sensitivity, specificity, flagged: ``Interval`` or ``None`` where the set cannot measure it
            (``flagged`` is the share of films the model refused: always measured).
    """

    source: str
    population: str
    operating_point: str
    threshold: float
    in_sample: bool
    films: int
    patients: int
    positives: int
    negatives: int
    auc: Interval | None
    sensitivity: Interval | None
    specificity: Interval | None
    flagged: Interval

    def __post_init__(self) -> None:
        for name in ("source", "population", "operating_point"):
            if not _NAME.match(getattr(self, name)):
                raise ValueError(f"claim {name} {getattr(self, name)!r}: lower-case letters, digits and _")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"claim threshold must be in (0, 1), got {self.threshold}")
        if self.films < 1 or self.patients < 1 or self.patients > self.films:
            raise ValueError(f"claim of {self.source}: {self.films} films of {self.patients} patients")
        if self.positives + self.negatives != self.films or min(self.positives, self.negatives) < 0:
            raise ValueError(f"claim of {self.source}: positives + negatives must be the films")
        if (self.sensitivity is None) != (self.positives == 0):
            raise ValueError(f"claim of {self.source}: sensitivity is measured exactly when there are positives")
        if (self.specificity is None) != (self.negatives == 0):
            raise ValueError(f"claim of {self.source}: specificity is measured exactly when there are negatives")
        if self.auc is not None and min(self.positives, self.negatives) == 0:
            raise ValueError(f"claim of {self.source}: a one-class set has no AUC")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source, "population": self.population, "operating_point": self.operating_point,
            "threshold": float(self.threshold), "in_sample": self.in_sample, "films": self.films,
            "patients": self.patients, "positives": self.positives, "negatives": self.negatives,
        }
        for m in METRICS:
            iv = getattr(self, m)
            out[m] = iv.as_list() if iv is not None else None
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Claim:
        try:
            return cls(
                source=str(d["source"]), population=str(d["population"]),
                operating_point=str(d["operating_point"]), threshold=float(d["threshold"]),
                in_sample=bool(d["in_sample"]), films=int(d["films"]), patients=int(d["patients"]),
                positives=int(d["positives"]), negatives=int(d["negatives"]),
                auc=Interval.parse(d.get("auc")), sensitivity=Interval.parse(d.get("sensitivity")),
                specificity=Interval.parse(d.get("specificity")), flagged=Interval.parse(d["flagged"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"claim {dict(d)!r}: missing or malformed field ({exc})") from None


@dataclass(frozen=True)
class Claims:
    """Every claim of one model, and how they were measured.

    Attributes:
        claims: The claims (at least one).
        model_sha256: sha256 of the model file the claims were measured on.
        method: How the intervals were computed (e.g. the patient bootstrap and its resamples).
        confidence: Two-sided confidence of every interval.
        generated_by: The command that measured them.
        notes: Free-text caveats, keyed by source.
        test_reads: Every read of the locked test side that measured claims into this model folder, oldest first
            (``{"when", "model_sha256", "split", "command"}``): a second read shows, whoever made it.
    """

    claims: tuple[Claim, ...]
    model_sha256: str
    method: str
    confidence: float = 0.95
    generated_by: str = ""
    notes: Mapping[str, str] = field(default_factory=dict)
    test_reads: tuple[Mapping[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.claims:
            raise ValueError("claims.json needs at least one claim")
        if not re.fullmatch(r"[0-9a-f]{64}", self.model_sha256):
            raise ValueError("claims.json: model_sha256 must be 64 hex digits")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")
        keys = [(c.source, c.operating_point) for c in self.claims]
        if len(set(keys)) != len(keys):
            raise ValueError("claims.json: one claim per (source, operating point)")
        for r in self.test_reads:
            if not {"when", "model_sha256", "split"} <= set(r):
                raise ValueError(f"claims.json: a test read needs when, model_sha256 and split, got {dict(r)!r}")

    @property
    def reads(self) -> int:
        """How many times the test side was read for this folder's claims (1 when the lock was kept)."""
        return len(self.test_reads)

    def find(self, source: str, operating_point: str) -> Claim | None:
        return next((c for c in self.claims if (c.source, c.operating_point) == (source, operating_point)), None)

    def as_dict(self) -> dict[str, Any]:
        return {"model_sha256": self.model_sha256, "method": self.method, "confidence": self.confidence,
                "generated_by": self.generated_by, "notes": dict(self.notes),
                "test_reads": [dict(r) for r in self.test_reads], "claims": [c.as_dict() for c in self.claims]}

    def save(self, path: str | Path) -> Path:
        from cxr.core.durable import write_durably

        path = Path(path)
        write_durably(path, (json.dumps(self.as_dict(), indent=1) + "\n").encode())
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Claims:
        try:
            return cls(claims=tuple(Claim.from_dict(c) for c in d["claims"]), model_sha256=str(d["model_sha256"]),
                       method=str(d["method"]), confidence=float(d.get("confidence", 0.95)),
                       generated_by=str(d.get("generated_by", "")), notes=dict(d.get("notes") or {}),
                       test_reads=tuple(dict(r) for r in d.get("test_reads") or ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise CxrError(f"claims.json: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Claims:
        path = Path(path)
        if not path.exists():
            raise CxrError(f"{path}: no {CLAIMS_FILE} (measure the model with `cxr claims` first)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise CxrError(f"{path}: not JSON ({exc})") from None
