"""What the listener takes in: which received instances are screened (:class:`ScreenFilter`) and which studies are
urgent (:func:`study_priority`, :class:`UrgentRule`). Pure rules over the header; no networking."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom import Dataset

#: SOP classes screened: CR, DX for presentation and for processing, and Secondary Capture.
ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
#: Requested Procedure Priority (0040,1003) values that make a study urgent.
URGENT_PRIORITIES = ("STAT", "HIGH")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(text: str) -> bool:
    """A DICOM UID: dotted digits, at most 64 characters."""
    return bool(_UID.match(text)) and len(text) <= 64


@dataclass(frozen=True)
class ScreenFilter:
    """Which received instances are screened. The others are accepted (C-STORE success, so that a PACS routing a
    whole study goes on with the rest of it), counted and audited as dropped, and not kept.

    Attributes:
        sop_classes: SOP Class UIDs screened (default: CR, DX for presentation and for processing, Secondary
            Capture).
        modalities: Modality (0008,0060) values screened, upper case (empty: any).
        body_parts: Body Part Examined (0018,0015) values screened, upper case (empty: any; an instance without one
            is screened, the eligibility rules judge it).
    """

    sop_classes: tuple[str, ...] = tuple(ACCEPTED_SOP_CLASSES)
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.sop_classes:
            raise ValueError("--screen-sop-class: name at least one SOP class to screen")
        for uid in self.sop_classes:
            if not is_uid(uid):
                raise ValueError(f"--screen-sop-class: {uid!r} is not a UID")
        for what, values in (("--screen-modality", self.modalities), ("--screen-body-part", self.body_parts)):
            for v in values:
                if not v.strip() or v != v.strip().upper() or len(v) > 16:
                    raise ValueError(f"{what}: {v!r} must be an upper-case DICOM code string (e.g. DX, CHEST)")

    @classmethod
    def of(cls, sop_classes: tuple[str, ...] = (), modalities: tuple[str, ...] = (),
           body_parts: tuple[str, ...] = ()) -> ScreenFilter:
        """From command-line values (empty SOP classes: the default set; case folded)."""
        return cls(tuple(sop_classes) or tuple(ACCEPTED_SOP_CLASSES), tuple(m.strip().upper() for m in modalities),
                   tuple(b.strip().upper() for b in body_parts))

    def drop_reason(self, sop_class: str, ds: Dataset | None = None) -> str | None:
        """Why an instance is not screened (``sop_class``, ``modality`` or ``body_part``), or ``None``."""
        if sop_class not in self.sop_classes:
            return "sop_class"
        if ds is None:
            return None
        if self.modalities and str(ds.get("Modality", "") or "").strip().upper() not in self.modalities:
            return "modality"
        part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
        if self.body_parts and part and part not in self.body_parts:
            return "body_part"
        return None


@dataclass(frozen=True)
class UrgentRule:
    """A site rule: a study is urgent when a header attribute has one of these values (case-insensitive), e.g.
    ``InstitutionalDepartmentName=Emergency`` or ``StationName=ED-DX-1``."""

    keyword: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        from pydicom.datadict import tag_for_keyword

        if tag_for_keyword(self.keyword) is None:
            raise ValueError(f"--urgent-if: {self.keyword!r} is not a DICOM keyword")
        if not self.values or not all(v.strip() for v in self.values):
            raise ValueError(f"--urgent-if {self.keyword}: give the values that make a study urgent")

    @classmethod
    def parse(cls, text: str) -> UrgentRule:
        key, sep, values = text.partition("=")
        if not sep:
            raise ValueError(f"--urgent-if: expected KEYWORD=VALUE[,VALUE...], got {text!r}")
        return cls(key.strip(), tuple(v.strip() for v in values.split(",")))

    def matches(self, ds: Dataset) -> bool:
        value = str(ds.get(self.keyword, "") or "").strip().upper()
        return bool(value) and value in {v.upper() for v in self.values}


def study_priority(ds: Dataset, rules: tuple[UrgentRule, ...] = ()) -> str:
    """``urgent`` when the header's Requested Procedure Priority (top level or in the Request Attributes
    Sequence) is STAT or HIGH, or a site rule matches; ``routine`` otherwise."""
    values = [ds.get("RequestedProcedurePriority", "")]
    for item in ds.get("RequestAttributesSequence", None) or []:
        values.append(item.get("RequestedProcedurePriority", ""))
    if any(str(v or "").strip().upper() in URGENT_PRIORITIES for v in values) or any(r.matches(ds) for r in rules):
        return "urgent"
    return "routine"
