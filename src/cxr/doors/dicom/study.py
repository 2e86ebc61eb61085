"""One result per study: the instances of a study screened together, combined by a stated rule.

``cxr listen --study-quiet-s S`` holds each screened instance in ``studies/<Study Instance UID>/`` until nothing
of that study has arrived for S seconds, then answers the study once:

* **frontal films** are the instances the model judged (``ok``) or refused for a reason other than their view;
  a lateral (refused by ``dicom_view_position``) is part of the study but makes no answer of its own;
* **the study answer** (:func:`combine`): *Pneumonia* when any frontal film is Pneumonia; else *Normal* when any
  frontal film was judged; else *not assessable* (every frontal film refused, or no frontal film at all: a reader
  looks at it). Its probability is the highest of the judged frontal films';
* the SR and the FHIR DiagnosticReport carry the study answer with each frontal film's own answer inside;
* **a film after the study was answered** (``answered/<Study UID>/`` in the spool keeps what it was answered
  with) makes the study answered again over all its films, earlier and new, by the same rule: the new SR takes the
  next Instance Number and names the earlier SR as its predecessor; the DiagnosticReport (one identifier per study
  and model) is updated in place with status ``amended``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from cxr.client.client import Prediction
from cxr.core import contract

#: The refusal rule that marks a lateral (or other non-frontal) film: part of the study, no answer of its own.
VIEW_RULE = "dicom_view_position"


@dataclass(frozen=True)
class StudyResult:
    """A study's combined answer.

    Attributes:
        status: ``ok`` or ``not_assessable``.
        label: ``Normal`` or ``Pneumonia`` when ``ok``.
        probability: The highest P(pneumonia) of the judged frontal films (``None`` unless ``ok``).
        threshold: The model's decision threshold.
        frontal: The frontal films' SOP Instance UIDs, in order.
        why: For ``not_assessable``: ``all_frontal_refused`` or ``no_frontal``.
    """

    status: contract.Status
    label: str | None
    probability: float | None
    threshold: float
    frontal: tuple[str, ...]
    why: str = ""

    def __post_init__(self) -> None:
        if self.status not in (contract.Status.OK, contract.Status.NOT_ASSESSABLE):
            raise ValueError("a study answer is ok or not_assessable")
        if (self.status is contract.Status.OK) != (self.label is not None and self.probability is not None):
            raise ValueError("a label and probability come with ok, and only with it")
        if (self.status is contract.Status.NOT_ASSESSABLE) != bool(self.why):
            raise ValueError("a not-assessable study says why, and only it")


def is_frontal(pred: Prediction) -> bool:
    """A film that counts for the study answer: judged, or refused for a reason other than its view."""
    return pred.status is not contract.Status.ERROR and pred.rule != VIEW_RULE


def combine(items: Sequence[tuple[str, Prediction]]) -> StudyResult:
    """The study answer of ``(SOP Instance UID, prediction)`` pairs (the module's rule)."""
    if not items:
        raise ValueError("a study answer needs at least one instance")
    frontal = [(uid, p) for uid, p in items if is_frontal(p)]
    threshold = items[0][1].threshold
    judged = [p for _, p in frontal if p.ok]
    uids = tuple(uid for uid, _ in frontal)
    if judged:
        best = max(judged, key=lambda p: float(p.probability))  # type: ignore[arg-type]
        label = contract.LABELS[1] if any(p.label == contract.LABELS[1] for p in judged) else contract.LABELS[0]
        return StudyResult(contract.Status.OK, label, float(best.probability), threshold, uids)  # type: ignore[arg-type]
    return StudyResult(contract.Status.NOT_ASSESSABLE, None, None, threshold, uids,
                       "all_frontal_refused" if frontal else "no_frontal")


def to_json(pred: Prediction) -> dict:
    """A prediction as JSON (kept beside its instance while the study waits)."""
    d = dataclasses.asdict(pred)
    d["status"] = pred.status.value
    return d


def from_json(d: dict) -> Prediction:
    """The prediction :func:`to_json` wrote."""
    d = dict(d)
    d["status"] = contract.Status(d["status"])
    if d.get("refusal") is not None:
        d["refusal"] = contract.Refusal(**d["refusal"])
    return Prediction(**d)
