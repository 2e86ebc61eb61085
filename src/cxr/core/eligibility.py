"""Declarative DICOM eligibility rules: which instances the model may judge.

In the manner of MONAI Deploy's series-selection rules, the rules are data, not
code: a JSON file of conditions on DICOM attributes (by keyword). The default
ships in the package (``src/cxr/core/data/eligibility.json``) and, with every exported
model, as ``<model>/eligibility.json``, whose text also travels in the served
config (parameter ``eligibility``) so that remote clients apply the rules the
server's operator chose. A site edits its model folder's file and runs
``cxr configs``.

Example condition::

    "ViewPosition": {"rule": "dicom_view_position", "allowed": ["PA", "AP"], "if_absent": "accept"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cxr.core import contract
from cxr.core.errors import CxrError, NotAssessableError

SCHEMA = "cxr-eligibility/1"
FILE_NAME = "eligibility.json"


@dataclass(frozen=True)
class Condition:
    """One attribute's condition.

    Attributes:
        keyword: DICOM attribute keyword (e.g. ``Modality``).
        rule: Rule name reported when it fails (a key of :data:`cxr.core.contract.RULES`).
        allowed: Accepted values (case-insensitive); empty means any.
        max: Largest accepted numeric value (``None``: no limit).
        if_absent: ``accept`` or ``refuse`` when the attribute is missing or empty.
    """

    keyword: str
    rule: str
    allowed: tuple[str, ...] = ()
    max: float | None = None
    if_absent: str = "accept"

    def __post_init__(self) -> None:
        if self.rule not in contract.RULES:
            raise ValueError(f"condition {self.keyword}: unknown rule {self.rule!r}")
        if self.if_absent not in ("accept", "refuse"):
            raise ValueError(f"condition {self.keyword}: if_absent must be 'accept' or 'refuse'")
        if not self.allowed and self.max is None:
            raise ValueError(f"condition {self.keyword}: give 'allowed' or 'max'")

    def check(self, value: object, name: str) -> None:
        """Raise :class:`NotAssessableError` when ``value`` fails (``None`` or ``''`` = absent)."""
        text = "" if value is None else str(value).strip()
        if not text:
            if self.if_absent == "refuse":
                raise contract.not_assessable(name, self.rule, f"{self.keyword} is missing")
            return
        if self.allowed and text.upper() not in {a.upper() for a in self.allowed}:
            raise contract.not_assessable(name, self.rule, f"{self.keyword} {text!r} not in {'/'.join(self.allowed)}",
                                          value=text, limit="/".join(self.allowed))
        if self.max is not None:
            try:
                number = float(text)
            except ValueError:
                raise contract.not_assessable(name, self.rule, f"{self.keyword} {text!r} is not a number", value=text,
                                              limit=self.max) from None
            if number > self.max:
                raise contract.not_assessable(name, self.rule, f"{self.keyword} {text} > {self.max:g}", value=number,
                                              limit=self.max)


@dataclass(frozen=True)
class Eligibility:
    """A named set of conditions, all of which an instance must meet."""

    name: str
    conditions: tuple[Condition, ...]
    text: str = ""

    def __post_init__(self) -> None:
        if not self.conditions:
            raise ValueError("eligibility rules need at least one condition")

    @classmethod
    def from_json(cls, text: str) -> Eligibility:
        """Parse the JSON text of an eligibility file.

        Raises:
            CxrError: Not valid JSON, wrong schema, or a malformed condition.
        """
        try:
            doc = json.loads(text)
            if doc.get("schema") != SCHEMA:
                raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
            conds = tuple(
                Condition(keyword=k, rule=v["rule"], allowed=tuple(v.get("allowed", ())), max=v.get("max"),
                          if_absent=v.get("if_absent", "accept"))
                for k, v in doc["conditions"].items()
            )
            return cls(name=str(doc.get("name", "")), conditions=conds, text=text)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CxrError(f"invalid eligibility rules: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> Eligibility:
        """Read an eligibility file."""
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise CxrError(f"cannot read eligibility rules {path}: {exc.strerror or exc}") from None

    @classmethod
    def default(cls) -> Eligibility:
        """The rules shipped with the package."""
        return _DEFAULT

    def check(self, dataset: object, name: str) -> None:
        """Check a pydicom ``Dataset``'s header.

        Raises:
            NotAssessableError: The first failed condition.
        """
        for c in self.conditions:
            c.check(getattr(dataset, "get", lambda *_: None)(c.keyword, None), name)

    def passes(self, dataset: object) -> bool:
        try:
            self.check(dataset, "")
        except NotAssessableError:
            return False
        return True


def default_text() -> str:
    """The JSON text of the shipped default rules."""
    return (resources.files("cxr.core") / "data" / FILE_NAME).read_text()  # 3.10: one name a joinpath


_DEFAULT = Eligibility.from_json(default_text())
