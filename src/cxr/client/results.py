"""Results on disk and on screen: the one CSV codec of a :class:`~cxr.client.client.Prediction`, and its presenters.

A prediction travels as numbers; this module is where it becomes text:

* :func:`to_row` / :func:`from_row`: the CSV (and journal) row of a prediction and the file's sha256. Floats are
  written with ``repr``, so they read back to the same number (a resumed run's JSON carries every digit); the
  refusal travels in its own columns (``rule``, ``rule_value`` and ``rule_limit`` as JSON, ``rule_detail``), never
  inside ``reason``.
* :func:`as_json`: the JSON object of a prediction (numbers as numbers).
* :func:`table`: the terminal table (the only place that rounds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from cxr.client.client import Prediction
from cxr.core import contract
from cxr.core.errors import DataError

#: CSV columns, those people read first first. Earlier releases wrote ``path, label, probability, threshold,
#: model_name, model_version, error, sha256, sop_instance_uid, status, reason, ood_score`` and then
#: ``path, status, label, probability, threshold, reason, ood_score, ...``; every reader goes by the header, and a
#: journal in another column set is rewritten once in this one (:class:`cxr.core.durable.AppendOnlyCsv`).
CSV_COLUMNS = (
    "path", "status", "label", "probability", "threshold", "operating_point", "reason", "rule", "rule_value", "rule_limit", "rule_detail",
    "ood_score",
    "model_name", "model_version", "model_sha256", "sop_instance_uid", "sha256", "error",
)
#: The journal's columns: the CSV's and whether an error is worth retrying.
JOURNAL_COLUMNS = (*CSV_COLUMNS, "retryable")


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _cell(v: float | str | None) -> str:
    """A refusal's value or limit as JSON: a number stays a number, a header's text stays text (quoted)."""
    return "" if v is None else json.dumps(v)


def _uncell(text: str) -> float | str | None:
    return None if not text else json.loads(text)


def to_row(pred: Prediction, sha256: str) -> dict[str, str]:
    """The CSV/journal row of one prediction of the file with content hash ``sha256``."""
    r = pred.refusal
    return {
        "path": pred.source,
        "status": pred.status.value,
        "label": pred.label or "",
        "probability": _num(pred.probability),
        "threshold": _num(pred.threshold),
        "operating_point": pred.operating_point,
        "reason": pred.reason or "",
        "rule": r.rule if r else "",
        "rule_value": _cell(r.value) if r else "",
        "rule_limit": _cell(r.limit) if r else "",
        "rule_detail": r.detail if r else "",
        "ood_score": _num(pred.ood_score),
        "model_name": pred.model_name,
        "model_version": pred.model_version,
        "model_sha256": pred.model_sha256,
        "sop_instance_uid": pred.sop_instance_uid or "",
        "sha256": sha256,
        "error": pred.error or "",
        "retryable": "1" if pred.retryable else "0",
    }


def from_row(row: Mapping[str, str], *, ood_threshold: float | None = None) -> tuple[Prediction, str]:
    """A prediction and its file's sha256 back from a row :func:`to_row` wrote.

    Raises:
        DataError: The row is not one this codec wrote (a ``not_assessable`` row without its rule, bad numbers).
    """
    try:
        status = contract.Status(row["status"])
        refusal = None
        if status is contract.Status.NOT_ASSESSABLE:
            if not row.get("rule"):
                raise DataError(f"{row.get('path')}: a not_assessable row without its rule (written by a release "
                                "before the refusal had its own columns)")
            refusal = contract.Refusal(row["rule"], _uncell(row.get("rule_value", "")),
                                       _uncell(row.get("rule_limit", "")), row.get("rule_detail", ""))
        pred = Prediction(
            source=row["path"], status=status, label=row.get("label") or None,
            probability=float(row["probability"]) if row.get("probability") else None,
            threshold=float(row["threshold"]), model_name=row.get("model_name", ""),
            model_version=row.get("model_version", ""), reason=row.get("reason") or None,
            sop_instance_uid=row.get("sop_instance_uid") or None,
            ood_score=float(row["ood_score"]) if row.get("ood_score") else None, ood_threshold=ood_threshold,
            retryable=row.get("retryable") == "1", refusal=refusal, model_sha256=row.get("model_sha256", ""),
            operating_point=row.get("operating_point", ""),
        )
    except (KeyError, ValueError) as exc:
        raise DataError(f"{row.get('path')}: not a predictions row ({type(exc).__name__}: {exc})") from None
    return pred, row.get("sha256", "")


def as_json(pred: Prediction, sha256: str = "") -> dict:
    """The JSON object of one prediction: numbers as numbers, absent values as ``null``."""
    r = pred.refusal
    return {
        "path": pred.source,
        "status": pred.status.value,
        "label": pred.label,
        "probability": pred.probability,
        "threshold": pred.threshold,
        "operating_point": pred.operating_point or None,
        "reason": pred.reason,
        "refusal": None if r is None else {"rule": r.rule, "value": r.value, "limit": r.limit, "detail": r.detail},
        "ood_score": pred.ood_score,
        "model_name": pred.model_name,
        "model_version": pred.model_version,
        "model_sha256": pred.model_sha256 or None,
        "sop_instance_uid": pred.sop_instance_uid,
        "sha256": sha256 or None,
        "error": pred.error,
    }


def refusal_text(refusal: contract.Refusal) -> str:
    """A refusal for people: what the rule means, then what it measured against its limit."""
    def fmt(v: float | str | None) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    measured = (f"{fmt(refusal.value)} (limit {fmt(refusal.limit)})" if refusal.value is not None
                else refusal.detail)
    return f"{refusal.description}: {measured}" if measured else refusal.description


def table(preds: Sequence[Prediction]) -> str:
    """The terminal table: one line per input, probabilities and thresholds rounded for people."""
    width = max([len(p.source) for p in preds] + [4])
    lines = [f"{'path':<{width}}  {'status':<14}  {'label':<9}  {'P(pneumonia)':>12}  {'thr':>6}  {'point':<10}  detail"]
    for p in preds:
        prob = contract.format_probability(p.probability) if p.probability is not None else "-"
        if p.refusal is not None:
            tail = f"{p.rule}: {refusal_text(p.refusal)}"
        elif p.reason:
            tail = p.reason
        else:
            tail = f"{p.model_name} v{p.model_version}"
        status = p.status.value.upper() if not p.ok else "ok"
        lines.append(f"{p.source:<{width}}  {status:<14}  {p.label or '-':<9}  {prob:>12}  {p.threshold:>6.4f}  "
                     f"{p.operating_point or '-':<10}  {tail}")
    return "\n".join(lines) + "\n"
