"""The model folder, typed: one place reads and writes its card, its served parameters and its provenance.

A model folder (``model_repository/<name>/``) holds::

    model_card.json      the card (ModelCard): file, sha256, calibration, ood, serving targets, go-live targets ...
    MODEL_CARD.md        the card for people (written by the exporter beside the JSON)
    config.pbtxt         Triton's config of the first target; configs/<target>.pbtxt for all of them
    eligibility.json     the DICOM eligibility rules it serves
    provenance.csv       every file that trained, validated, calibrated or set the OOD threshold
    reference.json       served outputs on reference films (drift monitoring, site audit)
    <version>/model.onnx the graph

The served parameters travel inside the Triton config as strings (generic Triton clients read them too).
:class:`ServedParams` is their one codec: :meth:`ServedParams.as_parameters` writes them for the config builder
and :meth:`ServedParams.from_parameters` reads them for the client, from the config file or the server's answer.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr.core import contract
from cxr.core.errors import CxrError, ModelIntegrityError

CARD_FILE = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
CONFIG_FILE = "config.pbtxt"
PROVENANCE_FILE = "provenance.csv"
REFERENCE_FILE = "reference.json"
#: Where the graph is when an older card does not say.
DEFAULT_MODEL_FILE = "1/model.onnx"
#: Columns of ``provenance.csv``.
PROVENANCE_COLUMNS = ("role", "source", "patient", "label", "path", "sha256")
#: Roles a file can have in building a model.
#: ``select`` chose something (checkpoint, calibration, a threshold, the OOD fit); ``test`` is read once, by the
#: final report (``cxr claims``), and enters nothing else. ``validation`` and ``calibration`` are the older,
#: unlocked roles of the same kind as ``select``.
PROVENANCE_ROLES = ("train", "validation", "calibration", "ood_reference", "select", "test", "adapt", "audit")
#: A name of an operating point.
_POINT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class ServedParams:
    """What a config tells clients, as string parameters: the one codec, both directions.

    Attributes:
        threshold: Decision threshold on ``probability``.
        sha256: sha256 of the model file (the Python backend and clients check it; '' when not published).
        ood_threshold: Largest ``ood_score`` still assessable (``None``: the model has no OOD output).
        eligibility: JSON text of the DICOM eligibility rules ('' when not published).
        labels: ``(negative, positive)`` labels.
        operating_points: Named thresholds, ``((name, threshold), ...)`` sorted by name (empty: the one
            ``threshold``, named :data:`cxr.core.contract.SINGLE_OPERATING_POINT`).
        default_operating_point: The point a client gets when it names none (its threshold is ``threshold``).
    """

    threshold: float
    sha256: str = ""
    ood_threshold: float | None = None
    eligibility: str = ""
    labels: tuple[str, ...] = contract.LABELS
    operating_points: tuple[tuple[str, float], ...] = ()
    default_operating_point: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        points = tuple(sorted((str(n), float(t)) for n, t in self.operating_points))
        object.__setattr__(self, "operating_points", points)
        if points:
            for name, thr in points:
                if not _POINT_NAME.match(name):
                    raise ValueError(f"operating point {name!r}: lower-case letters, digits and _")
                if not 0.0 < thr < 1.0:
                    raise ValueError(f"operating point {name}: threshold must be in (0, 1), got {thr}")
            if len({n for n, _ in points}) != len(points):
                raise ValueError("operating point names must be unique")
            named = dict(points)
            if self.default_operating_point not in named:
                raise ValueError(f"default operating point {self.default_operating_point!r} is not one of {sorted(named)}")
            if named[self.default_operating_point] != self.threshold:
                raise ValueError("threshold must be the default operating point's threshold")
        elif self.default_operating_point not in ("", contract.SINGLE_OPERATING_POINT):
            raise ValueError("a default operating point needs operating points")
        if self.ood_threshold is not None and not self.ood_threshold > 0:
            raise ValueError(f"ood_threshold must be > 0, got {self.ood_threshold}")
        if len(self.labels) != 2:
            raise ValueError(f"expected two labels, got {self.labels}")
        if self.eligibility:  # one spelling of the rules (compact JSON), however the file was indented
            try:
                compact = json.dumps(json.loads(self.eligibility), separators=(",", ":"))
            except ValueError as exc:
                raise ValueError(f"eligibility is not JSON: {exc}") from None
            object.__setattr__(self, "eligibility", compact)

    def as_parameters(self) -> dict[str, str]:
        """The config's string parameters (``repr`` of floats: they read back to the same number)."""
        params = {
            contract.PARAM_THRESHOLD: repr(float(self.threshold)),
            contract.PARAM_LABELS: ",".join(self.labels),
            contract.PARAM_SHA256: self.sha256,
        }
        if self.ood_threshold is not None:
            params[contract.PARAM_OOD_THRESHOLD] = repr(float(self.ood_threshold))
        if self.eligibility:
            params[contract.PARAM_ELIGIBILITY] = self.eligibility
        if self.operating_points:
            params[contract.PARAM_OPERATING_POINTS] = json.dumps({n: float(t) for n, t in self.operating_points},
                                                                  separators=(",", ":"))
            params[contract.PARAM_DEFAULT_OPERATING_POINT] = self.default_operating_point
        return params

    @property
    def point_names(self) -> tuple[str, ...]:
        """The names a client may ask for (the single point's name when the model publishes none)."""
        return tuple(n for n, _ in self.operating_points) or (contract.SINGLE_OPERATING_POINT,)

    @property
    def default_point(self) -> str:
        return self.default_operating_point or contract.SINGLE_OPERATING_POINT

    def threshold_for(self, name: str | None = None) -> tuple[str, float]:
        """``(name, threshold)`` of the named operating point, or of the default one when ``name`` is None.

        Raises:
            CxrError: The model publishes no point of that name (the message lists the ones it has).
        """
        if name is None:
            return self.default_point, self.threshold
        if not self.operating_points:
            if name == contract.SINGLE_OPERATING_POINT:
                return name, self.threshold
        else:
            named = dict(self.operating_points)
            if name in named:
                return name, named[name]
        raise CxrError(f"operating point {name!r}: this model has {', '.join(self.point_names)}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> ServedParams:
        """Read the parameters back: plain strings, or Triton's ``{"string_value": ...}`` form (JSON and gRPC)."""
        flat = {k: str(v.get("string_value", "") if isinstance(v, Mapping) else v) for k, v in params.items()}
        ood = flat.get(contract.PARAM_OOD_THRESHOLD, "")
        points_text = flat.get(contract.PARAM_OPERATING_POINTS, "")
        try:
            points = tuple(json.loads(points_text).items()) if points_text else ()
        except ValueError as exc:
            raise CxrError(f"served parameter {contract.PARAM_OPERATING_POINTS} is not JSON: {exc}") from None
        return cls(
            operating_points=points,
            default_operating_point=flat.get(contract.PARAM_DEFAULT_OPERATING_POINT, ""),
            threshold=float(flat.get(contract.PARAM_THRESHOLD) or contract.DEFAULT_THRESHOLD),
            sha256=flat.get(contract.PARAM_SHA256, ""),
            ood_threshold=float(ood) if ood else None,
            eligibility=flat.get(contract.PARAM_ELIGIBILITY, ""),
            labels=tuple(flat.get(contract.PARAM_LABELS, ",".join(contract.LABELS)).split(",")),
        )


def parse_config(text: str):
    """A ``model_config_pb2.ModelConfig`` from ``config.pbtxt`` text."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(text, mc.ModelConfig())


def render_config(cfg, *, target: str) -> str:
    """``config.pbtxt`` text of a ``ModelConfig`` message, with a header saying where it came from."""
    from google.protobuf import text_format

    head = f"# Generated by cxr (target: {target}); edit src/cxr/export/triton_config.py or run `cxr configs`, not this file.\n"
    return head + text_format.MessageToString(cfg)


def config_as_dict(cfg) -> dict:
    """A ``ModelConfig`` as the dict Triton's HTTP API serves (field names as in the proto)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


#: The top-level sections of ``model_card.json``; :meth:`ModelCard.replace` refuses any other name.
CARD_SECTIONS = (
    "model", "version", "precision", "file", "sha256", "bytes", "architecture", "contract", "training", "calibration",
    "operating_points", "default_operating_point", "export", "evaluations", "evaluations_of", "commands", "environment",
    "created", "updated", "serving", "ood", "provenance", "targets", "claims", "explain", "site", "adaptation",
)


@dataclass(frozen=True)
class ModelCard:
    """``model_card.json``, read and written only through this class: typed properties read it (each section a copy,
    so editing one changes no card), and the ``with_``/:meth:`replace` methods return a new, validated card that
    :meth:`ModelDir.write_card` writes.

    Attributes:
        data: The whole card as JSON values (read it through the properties).
    """

    data: Mapping[str, Any] = field(repr=False)

    def __post_init__(self) -> None:
        sha = self.data.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64):
            raise CxrError("model card: 'sha256' must be the 64-hex-digit sha256 of the model file")
        threshold = (self.data.get("calibration") or {}).get("threshold")
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
            raise CxrError(f"model card: calibration.threshold must be in (0, 1), got {threshold!r}")
        points = self.data.get("operating_points") or {}
        if points:
            default = self.data.get("default_operating_point")
            if default not in points:
                raise CxrError(f"model card: default_operating_point {default!r} is not one of {sorted(points)}")
            if float(points[default]["threshold"]) != float(threshold):
                raise CxrError("model card: calibration.threshold must be the default operating point's threshold")

    def _section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(dict(self.data.get(name) or {}))

    # -- reads -------------------------------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The model's name (its folder's name when exported)."""
        return str(self.data.get("model", ""))

    @property
    def version(self) -> int:
        return int(self.data.get("version", 1))

    @property
    def file(self) -> str:
        """The graph's path inside the model folder."""
        return str(self.data.get("file") or DEFAULT_MODEL_FILE)

    @property
    def sha256(self) -> str:
        return str(self.data["sha256"])

    @property
    def bytes(self) -> int | None:
        """Size of the model file (``None`` when the card does not say)."""
        size = self.data.get("bytes")
        return int(size) if size else None

    @property
    def threshold(self) -> float:
        return float(self.data["calibration"]["threshold"])

    @property
    def calibration(self) -> dict[str, Any]:
        """``calibration``: the served threshold, its rule, what it was fitted on, its metrics and the scaling."""
        return self._section("calibration")

    @property
    def operating_points(self) -> dict[str, dict[str, Any]]:
        """``{name: {"threshold": ..., "population": ..., "chosen_on": ..., "rule": ...}}`` (empty for a card that
        states one threshold only)."""
        return {str(k): dict(v) for k, v in self._section("operating_points").items()}

    @property
    def default_operating_point(self) -> str:
        return str(self.data.get("default_operating_point") or "")

    @property
    def ood(self) -> dict[str, Any]:
        """``ood``: the ``ood_score`` output's fit and threshold (empty: the model has no OOD output)."""
        return self._section("ood")

    @property
    def ood_threshold(self) -> float | None:
        thr = (self.data.get("ood") or {}).get("threshold")
        return float(thr) if thr else None

    @property
    def architecture(self) -> str:
        return str(self.data.get("architecture", "unknown"))

    @property
    def precision(self) -> str:
        return str(self.data.get("precision", "fp32"))

    @property
    def serving_targets(self) -> tuple[str, ...]:
        """Config targets stated by the card (empty: the exporter's defaults for its precision)."""
        return tuple((self.data.get("serving") or {}).get("targets") or ())

    @property
    def go_live_targets(self) -> dict[str, float]:
        """The site audit's targets stated by the card (``targets``), as numbers."""
        return {k: float(v) for k, v in (self.data.get("targets") or {}).items()}

    @property
    def training(self) -> dict[str, Any]:
        """``training``: sources, split, configuration and history of the training run."""
        return self._section("training")

    @property
    def export(self) -> dict[str, Any]:
        """``export``: opset and the parity of every exported precision."""
        return self._section("export")

    @property
    def evaluations(self) -> dict[str, dict[str, Any]]:
        """``{name: report}`` of the evaluations the exporter found (in-sample where the set chose something)."""
        return self._section("evaluations")

    @property
    def evaluations_of(self) -> str:
        """What the evaluations measured (the Keras model, the site's audit part ...)."""
        return str(self.data.get("evaluations_of", ""))

    @property
    def commands(self) -> tuple[str, ...]:
        """The commands that built the model, in order."""
        return tuple(str(c) for c in self.data.get("commands") or ())

    @property
    def provenance(self) -> dict[str, Any]:
        """``provenance``: the provenance file's name and its summary by role and source (empty when none)."""
        return self._section("provenance")

    @property
    def claims(self) -> dict[str, Any]:
        """``claims``: where ``claims.json`` was measured (empty when ``cxr claims`` has not run)."""
        return self._section("claims")

    @property
    def adaptation(self) -> dict[str, Any]:
        """``adaptation``: the report of ``cxr adapt`` (empty for a model that was not adapted)."""
        return self._section("adaptation")

    @property
    def explain(self) -> dict[str, Any]:
        """``explain``: the model-randomisation verdict of ``cxr explain-eval`` (empty when not measured)."""
        return self._section("explain")

    # -- edits (each returns a new, validated card) ------------------------------------------------------------------

    def replace(self, **sections: Any) -> ModelCard:
        """A card with these top-level sections set (``None`` removes one); names outside :data:`CARD_SECTIONS`
        are refused, so a misspelt section cannot be written."""
        unknown = sorted(set(sections) - set(CARD_SECTIONS))
        if unknown:
            raise ValueError(f"model card: no section {', '.join(unknown)} (sections: {', '.join(CARD_SECTIONS)})")
        data = {k: v for k, v in self.data.items() if sections.get(k, v) is not None}
        data.update({k: v for k, v in sections.items() if v is not None})
        return ModelCard(data)

    def with_calibration(self, **fields: Any) -> ModelCard:
        """A card whose ``calibration`` has these fields changed (the others kept)."""
        return self.replace(calibration={**self.calibration, **fields})

    def with_outputs(self, outputs: Sequence[Mapping[str, Any]]) -> ModelCard:
        """A card whose ``contract.outputs`` lists the graph's outputs (name, dtype, shape)."""
        return self.replace(contract={**self._section("contract"), "outputs": [dict(o) for o in outputs]})

    def with_command(self, command: str, *, once: bool = False) -> ModelCard:
        """A card listing ``command`` last among its commands (unchanged for ``''``, or with ``once`` when the
        command is listed already)."""
        if not command or (once and command in self.commands):
            return self
        return self.replace(commands=[*self.commands, command])

    def with_default_point(self, name: str) -> ModelCard:
        """A card whose default operating point is ``name`` (a site's choice): its ``calibration.threshold``, which
        the configs serve as ``threshold``, follows.

        Raises:
            CxrError: The card has no point of that name.
        """
        points = self.operating_points
        if name not in points:
            raise CxrError(f"operating point {name!r}: {self.model or 'the model'} has "
                           f"{', '.join(sorted(points)) or 'none'}")
        if name == self.default_operating_point:
            return self
        calibration = {**self.calibration, "threshold": points[name]["threshold"],
                       "rule": f"operating point {name} (site default; was {self.default_operating_point})"}
        return self.replace(default_operating_point=name, calibration=calibration)

    def to_json(self) -> str:
        """The card's file text."""
        return json.dumps(self.data, indent=1, default=str) + "\n"


@dataclass(frozen=True)
class ModelDir:
    """One model folder of a Triton model repository.

    Attributes:
        path: The folder (``<repository>/<model name>``).
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE

    def has_card(self) -> bool:
        return self.card_path.exists()

    def card(self) -> ModelCard:
        """The card (a :class:`CxrError` naming the folder when there is none)."""
        if not self.card_path.exists():
            raise CxrError(f"{self.path}: no {CARD_FILE} (export the model with `cxr export` first)")
        return ModelCard(json.loads(self.card_path.read_text()))

    def write_card(self, card: ModelCard, markdown: str | None = None) -> ModelCard:
        """Write the card (a :class:`ModelCard`, validated when it was made) durably, and its Markdown twin when
        given."""
        from cxr.core.durable import write_durably

        if not isinstance(card, ModelCard):
            raise TypeError(f"write_card takes a ModelCard, not {type(card).__name__}")
        write_durably(self.card_path, card.to_json().encode())
        if markdown is not None:
            write_durably(self.path / CARD_MARKDOWN, markdown.encode())
        return card

    def onnx_path(self, card: ModelCard | None = None) -> Path:
        return self.path / (card or self.card()).file

    def verify(self, card: ModelCard | None = None) -> Path:
        """The graph's path, after checking its sha256 against the card.

        Raises:
            ModelIntegrityError: The file is missing or differs from the card.
        """
        from cxr.core.integrity import sha256_file

        card = card or self.card()
        path = self.onnx_path(card)
        actual = sha256_file(path) if path.exists() else "missing"
        if actual != card.sha256:
            raise ModelIntegrityError(f"{path}: sha256 {actual} does not match model card {card.sha256}")
        return path

    def config_path(self, config_name: str | None = None) -> Path:
        return self.path / "configs" / f"{config_name}.pbtxt" if config_name else self.path / CONFIG_FILE

    def read_config(self, config_name: str | None = None) -> dict:
        """``config.pbtxt`` (or ``configs/<name>.pbtxt``) as the dict Triton serves."""
        path = self.config_path(config_name)
        if not path.exists():
            raise CxrError(f"model config not found: {path}")
        return config_as_dict(parse_config(path.read_text()))

    def write_config(self, cfg, *, target: str, config_name: str | None = None) -> Path:
        """Write a ``ModelConfig`` message as ``config.pbtxt`` (or ``configs/<name>.pbtxt``)."""
        from cxr.core.durable import write_durably

        path = self.config_path(config_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, render_config(cfg, target=target).encode())
        return path

    def served_params(self, config_name: str | None = None) -> ServedParams:
        """The parameters the folder's config serves (what a client of this model reads)."""
        return ServedParams.from_parameters(self.read_config(config_name).get("parameters") or {})

    def provenance(self) -> list[dict]:
        """Rows of ``provenance.csv`` (empty when there is none)."""
        return read_provenance(self.path / PROVENANCE_FILE)

    def write_provenance(self, rows: Sequence[Mapping], *, replace_roles: Sequence[str] = ()) -> None:
        write_provenance(self.path / PROVENANCE_FILE, rows, replace_roles=replace_roles)

    def reference(self) -> dict | None:
        """``reference.json`` (served outputs on reference films), or ``None`` when the folder has none."""
        path = self.path / REFERENCE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def write_reference(self, reference: Mapping) -> None:
        from cxr.core.durable import write_durably

        write_durably(self.path / REFERENCE_FILE, (json.dumps(reference) + "\n").encode())


#: Where a model folder's previous version is kept when a command writes over it: a folder beside the repository,
#: ``<repository>.previous/<name>-<UTC time>``, never inside it (Triton would load a copy there as another model).
PREVIOUS_SUFFIX = ".previous"


def keep_previous(folder: Path, *, now: datetime | None = None) -> Path:
    """Copy the model folder ``folder`` aside before a command writes into it, and return the copy.

    The copy lies in ``<repository>.previous/<name>-<YYYYmmddTHHMMSSZ>`` (a suffix ``-2``, ``-3`` ... when that exists)
    and appears whole or not at all (copied under a temporary name, then renamed): moving it back restores the folder.
    """
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        raise CxrError(f"{folder}: no model folder to keep")
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    aside = folder.parent.parent / f"{folder.parent.name}{PREVIOUS_SUFFIX}"
    dest, n = aside / f"{folder.name}-{stamp}", 1
    while dest.exists():
        n += 1
        dest = aside / f"{folder.name}-{stamp}-{n}"
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(folder, partial, symlinks=True)
    os.replace(partial, dest)
    return dest


def model_dirs(repository: Path, names: Sequence[str] = ()) -> list[ModelDir]:
    """The model folders with a card in a repository (only ``names`` when given), sorted by name."""
    found = [ModelDir(p.parent) for p in sorted(Path(repository).glob(f"*/{CARD_FILE}"))]
    return [d for d in found if not names or d.name in names]


def read_provenance(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``provenance.csv`` (empty when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_provenance(path: str | os.PathLike, rows: Sequence[Mapping], *, replace_roles: Sequence[str] = ()) -> None:
    """Write ``provenance.csv`` durably: the existing rows of other roles are kept, ``replace_roles`` are replaced.
    Rows are grouped by role in :data:`PROVENANCE_ROLES`' order (each role's rows in the order given), so
    rewriting one role leaves the file's other lines where they were."""
    from cxr.core.durable import write_durably

    path = Path(path)
    kept = [r for r in read_provenance(path) if r["role"] not in set(replace_roles)]
    rank = {role: i for i, role in enumerate(PROVENANCE_ROLES)}
    both = sorted([*kept, *rows], key=lambda r: rank.get(r["role"], len(rank)))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PROVENANCE_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(both)
    write_durably(path, buf.getvalue().encode())
