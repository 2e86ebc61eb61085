"""Datasets in the Kaggle layout, several sources, patient-grouped splits and the decoded-image cache.

Layout: ``<root>/<split>/{NORMAL,PNEUMONIA}/*`` (``split`` = train, val, test)
or, for a single labelled sample such as the deployment-site set,
``<root>/{NORMAL,PNEUMONIA}/*``.

A training run may draw on several *sources* (hospitals or collections), each
a class-folder root with an optional ``MANIFEST.csv`` that names the patient
of each file (a ``patient`` column, or ``patient=ID`` inside ``notes``).
Patient ids are namespaced by source (``nih:00001299``), the split keeps every
patient on one side within each (source, class) stratum, and
:func:`cell_masses` gives the sampling mass that keeps source and class apart.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.core import contract, imaging
from cxr.core.errors import DataError
from cxr.core.model_dir import PROVENANCE_ROLES

logger = logging.getLogger(__name__)

_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL2 = re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE)
_IM = re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE)
#: NIH ChestX-ray14: ``PATIENT_FOLLOWUP.png``, 8-digit patient, 3-digit follow-up.
_NIH = re.compile(r"^(\d{8})_\d{3}\.")


def patient_id(filename: str) -> str:
    """Patient (or series) id encoded in a Kaggle file name.

    ``person1000_bacteria_2931.jpeg`` -> ``person1000``;
    ``IM-0115-0001.jpeg`` -> ``IM-0115``; ``NORMAL2-IM-0381-0001.jpeg`` ->
    ``NORMAL2-IM-0381`` (IM- and NORMAL2-IM- are kept apart as separate
    series); an NIH ChestX-ray14 name ``00001299_003.png`` -> ``00001299``.
    Any other name is its own patient (its stem).
    """
    stem = Path(filename).name
    for pattern in (_PERSON, _NORMAL2, _IM, _NIH):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return Path(stem).stem


#: Name of the Kaggle source (the training root given by ``--data``).
KAGGLE = "kaggle"
_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: File path.
        label: Class index (0 Normal, 1 Pneumonia).
        patient: Patient id (from the file name, or the source's manifest, namespaced by source).
        source: Name of the source it came from.
    """

    path: Path
    label: int
    patient: str
    source: str = KAGGLE

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label}")


@dataclass(frozen=True)
class Source:
    """A labelled source: ``root/{NORMAL,PNEUMONIA}/*``, optionally with ``root/MANIFEST.csv``.

    Attributes:
        name: Short name (lower case, digits, underscore), used in split entries and reports.
        root: The class-folder root.
    """

    name: str
    root: Path

    def __post_init__(self) -> None:
        if not _SOURCE_NAME.match(self.name):
            raise ValueError(f"source name {self.name!r}: use lower-case letters, digits and _ (e.g. nih)")

    @classmethod
    def parse(cls, text: str) -> Source:
        """``NAME=PATH`` (the ``cxr train --source`` form)."""
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise DataError(f"--source {text!r}: expected NAME=PATH")
        try:
            return cls(name.strip(), Path(path))
        except ValueError as exc:
            raise DataError(str(exc)) from None


def manifest_patients(root: Path) -> dict[str, str]:
    """File name -> patient id from ``root/MANIFEST.csv`` (``patient`` column, or ``patient=ID`` in ``notes``)."""
    path = Path(root) / "MANIFEST.csv"
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            name = row.get("file_name") or row.get("filename")
            pid = (row.get("patient") or "").strip()
            if not pid:
                m = re.search(r"patient=([^;,\s]+)", row.get("notes") or "")
                pid = m.group(1) if m else ""
            if name and pid:
                out[name] = pid
    return out


MANIFEST_COLUMNS = ("label", "file_name", "patient")


def write_manifest(root: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write ``root/MANIFEST.csv`` (``label``, ``file_name``, ``patient``), the form :func:`manifest_patients` reads."""
    path = Path(root) / "MANIFEST.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def source_samples(src: Source) -> list[Sample]:
    """Every image of a source, with patient ids from its manifest (else the file name), namespaced by source."""
    patients = manifest_patients(src.root)
    return [
        Sample(s.path, s.label, f"{src.name}:{patients.get(s.path.name, s.patient)}", src.name)
        for s in list_samples(src.root)
    ]


def folder_samples(folder: str | os.PathLike) -> list[Sample]:
    """A labelled folder as a source named after the folder (lower-cased; other characters become ``_``)."""
    name = re.sub(r"[^a-z0-9_]", "_", Path(folder).resolve().name.lower()).lstrip("_0123456789") or "site"
    return source_samples(Source(name[:32], Path(folder)))


def cell_masses(samples: Sequence[Sample]) -> dict[tuple[str, int], float]:
    """Sampling mass of each (source, class) cell: every class gets half, split equally among the sources that
    have it. A source's own class balance then cannot be learned as a cue from Kaggle's 74% Pneumonia or NIH's
    78% Normal; a one-class source (e.g. COVID-19 inpatients) still carries only its class, and its share is no
    larger than any other source's share of that class."""
    cells = sorted({(s.source, s.label) for s in samples})
    out: dict[tuple[str, int], float] = {}
    for label in (0, 1):
        have = [c for c in cells if c[1] == label]
        if not have:
            raise DataError(f"class {contract.LABELS[label]} has no training images")
        for c in have:
            out[c] = 0.5 / len(have)
    return out


def list_samples(folder: str | os.PathLike) -> list[Sample]:
    """List ``folder/{NORMAL,PNEUMONIA}/*`` images, sorted by path.

    Raises:
        DataError: The folder has no class sub-folders or no images.
    """
    root = Path(folder)
    samples: list[Sample] = []
    found_class_dir = False
    for label, class_dir in enumerate(contract.CLASS_DIRS):
        d = root / class_dir
        if not d.is_dir():
            continue
        found_class_dir = True
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in contract.IMAGE_SUFFIXES:
                samples.append(Sample(p, label, patient_id(p.name)))
    if not found_class_dir:
        raise DataError(f"{root}: expected sub-folders {'/'.join(contract.CLASS_DIRS)} (Kaggle layout)")
    if not samples:
        raise DataError(f"{root}: no images found")
    return samples


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """Return ``root/split`` if it exists, else ``root`` when it is itself a class-folder root."""
    root = Path(root)
    if (root / split).is_dir():
        return root / split
    if any((root / c).is_dir() for c in contract.CLASS_DIRS):
        return root
    raise DataError(f"{root}: no '{split}' split and no {'/'.join(contract.CLASS_DIRS)} folders")


@dataclass(frozen=True)
class Split:
    """A patient-grouped train/validation split, reproducible from its file.

    Entries are ``SOURCE/CLASS/FILE`` with ``roots`` naming each source's
    folder (relative to the repository when beside it). Splits written before
    sources existed have no ``roots`` and entries ``CLASS/FILE`` under the
    Kaggle root's ``train/``; :meth:`samples` reads both.
    """

    seed: int
    val_fraction: float
    train: tuple[str, ...]
    val: tuple[str, ...]
    roots: tuple[tuple[str, str], ...] = ()
    val_fractions: tuple[tuple[str, float], ...] = ()
    test: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        sides = [set(self.train), set(self.val), set(self.test)]
        if sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2]:
            raise ValueError("a film is on two sides of the split")

    @property
    def locked(self) -> bool:
        """A locked split has test patients: ``val`` is then the select side, and ``test`` is read only by the
        final report (``cxr claims``)."""
        return bool(self.test)

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON (relative paths)."""
        payload: dict = {"seed": self.seed, "val_fraction": self.val_fraction}
        if self.roots:
            payload["roots"] = dict(self.roots)
            payload["val_fractions"] = dict(self.val_fractions)
        payload.update(train=list(self.train), val=list(self.val))
        if self.test:
            payload["test"] = list(self.test)
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        """Read a split written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls(int(d["seed"]), float(d["val_fraction"]), tuple(d["train"]), tuple(d["val"]),
                   tuple(sorted((d.get("roots") or {}).items())),
                   tuple(sorted((k, float(v)) for k, v in (d.get("val_fractions") or {}).items())),
                   tuple(d.get("test") or ()))

    def sources(self, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """Source name -> folder. A split without roots is Kaggle's, under ``data_dir`` (its ``train/``)."""
        from cxr.core.paths import REPO_ROOT

        if self.roots:
            return {k: (REPO_ROOT / v if not Path(v).is_absolute() else Path(v)) for k, v in self.roots}
        if data_dir is None:
            raise DataError("this split has no source roots: give the Kaggle root it was made from (--data)")
        return {KAGGLE: split_dir(data_dir, "train")}

    def samples(self, side: str, data_dir: str | os.PathLike | None = None) -> list[Sample]:
        """The ``train``, ``val`` (``select`` of a locked split) or ``test`` side as samples (source, label and
        patient filled in)."""
        side = {"select": "val"}.get(side, side)
        if side not in ("train", "val", "test"):
            raise ValueError(f"side must be train, val (select) or test, got {side!r}")
        roots = self.sources(data_dir)
        patients = {name: manifest_patients(root) for name, root in roots.items()}
        out = []
        for entry in getattr(self, side):
            parts = Path(entry).parts
            name, rel = (KAGGLE, Path(entry)) if parts[0] in contract.CLASS_DIRS else (parts[0], Path(*parts[1:]))
            if name not in roots:
                raise DataError(f"split entry {entry!r}: unknown source {name!r}")
            path = roots[name] / rel
            pid = patients[name].get(path.name, patient_id(path.name))
            out.append(Sample(path, contract.CLASS_DIRS.index(rel.parts[0]), f"{name}:{pid}", name))
        return out


def take_patients(samples: Sequence[Sample], fraction: float, order: Callable[[list[str]], list[str]], *,
                  exclude: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Patients taken, class by class, in the ``order`` given to each class's sorted patient ids, until their films
    reach ``fraction`` of the class's films. A patient with films of both classes is taken once; patients in
    ``exclude`` never (their films still count in the class's total)."""
    films: dict[tuple[int, str], int] = defaultdict(int)
    for s in samples:
        films[(s.label, s.patient)] += 1
    chosen: set[str] = set()
    for label in (0, 1):
        patients = sorted(p for lab, p in films if lab == label)
        target = fraction * sum(films[(label, p)] for p in patients)
        taken = 0
        for p in order(patients):
            if taken >= target:
                break
            if p in chosen or p in exclude:
                continue
            chosen.add(p)
            taken += films[(label, p)]
    return chosen


def draw_patients(samples: Sequence[Sample], fraction: float, rng: random.Random, *,
                  exclude: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Patients drawn at random (:func:`take_patients`, shuffled with ``rng`` after sorting, so a seed reproduces the
    draw). Used by the training split (validation side) and the lock."""

    def shuffled(patients: list[str]) -> list[str]:
        rng.shuffle(patients)
        return patients

    return take_patients(samples, fraction, shuffled, exclude=exclude)


def make_source_split(
    sources: Sequence[tuple[Source, Sequence[Sample]]], *, val_fraction: float = 0.15,
    val_fractions: dict[str, float] | None = None, seed: int = 0,
) -> Split:
    """Split several sources by patient, stratified by (source, class); entries ``SOURCE/CLASS/FILE``.

    ``val_fractions`` overrides ``val_fraction`` per source (small sources need a larger share to validate on).
    """
    from cxr.core.paths import relative

    fractions = {src.name: (val_fractions or {}).get(src.name, val_fraction) for src, _ in sources}
    for name, f in fractions.items():
        if not 0.0 < f < 1.0:
            raise DataError(f"validation fraction of {name} must be in (0, 1), got {f}")
    rng = random.Random(seed)
    train: list[str] = []
    val: list[str] = []
    for src, samples in sources:
        val_patients = draw_patients(samples, fractions[src.name], rng)
        for s in samples:
            entry = f"{src.name}/{s.path.relative_to(src.root).as_posix()}"
            (val if s.patient in val_patients else train).append(entry)
    return Split(seed, val_fraction, tuple(sorted(train)), tuple(sorted(val)),
                 tuple(sorted((src.name, relative(src.root)) for src, _ in sources)),
                 tuple(sorted(fractions.items())))


@dataclass(frozen=True)
class LockShares:
    """How one source's patients are locked: shares of its films (by patient, per class) for select and test;
    the rest trains. ``select + test >= 1`` gives a source that never trains (a deployment-site sample)."""

    select: float
    test: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.select < 1.0 and 0.0 <= self.test < 1.0 and self.select + self.test > 0):
            raise ValueError(f"lock shares must be in [0, 1), not both 0: select {self.select}, test {self.test}")


def make_locked_split(
    sources: Sequence[tuple[Source, Sequence[Sample], LockShares]], *, seed: int = 0,
) -> Split:
    """Lock every source's patients into train, select and test (entries ``SOURCE/CLASS/FILE``).

    Test patients are drawn first, by class, then select patients from the rest; a patient is on one side
    only. Select chooses everything (checkpoint, calibration, thresholds, the OOD fit); test is read once,
    by the final report, and enters nothing else.
    """
    from cxr.core.paths import relative

    rng = random.Random(seed)
    train: list[str] = []
    select: list[str] = []
    test: list[str] = []
    for src, samples, shares in sources:
        samples = same_content_same_patient(samples)
        test_patients = draw_patients(samples, shares.test, rng)
        if shares.select + shares.test >= 1.0:
            select_patients = {s.patient for s in samples} - test_patients
        else:
            select_patients = draw_patients(samples, shares.select, rng, exclude=test_patients)
        for s in samples:
            entry = f"{src.name}/{s.path.relative_to(src.root).as_posix()}"
            side = test if s.patient in test_patients else select if s.patient in select_patients else train
            side.append(entry)
    mean_select = float(np.mean([sh.select for _, _, sh in sources])) or 0.15
    return Split(seed, min(max(mean_select, 0.01), 0.99), tuple(sorted(train)), tuple(sorted(select)),
                 tuple(sorted((src.name, relative(src.root)) for src, _, _ in sources)),
                 tuple(sorted((src.name, sh.select) for src, _, sh in sources)), tuple(sorted(test)))


def content_hashes(samples: Sequence[Sample]) -> list[str]:
    """sha256 of each sample's file: from its source's ``MANIFEST.csv`` (a ``sha256`` column) when listed there,
    else read from the file."""
    from cxr.core.integrity import sha256_file

    listed: dict[Path, dict[str, str]] = {}
    out = []
    for s in samples:
        root = s.path.parent.parent
        if root not in listed:
            listed[root] = {}
            manifest = root / "MANIFEST.csv"
            if manifest.exists():
                with manifest.open(newline="") as fh:
                    listed[root] = {r.get("file_name") or r.get("filename") or "": r.get("sha256") or ""
                                    for r in csv.DictReader(fh)}
        out.append(listed[root].get(s.path.name) or sha256_file(s.path))
    return out


def same_content_same_patient(samples: Sequence[Sample]) -> list[Sample]:
    """Samples whose files have identical content joined under one patient (the first, sorted), so that a lock
    cannot put one image on two sides under two ids (SIIM holds the same film under two studies)."""
    parent: dict[str, str] = {s.patient: s.patient for s in samples}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    first: dict[str, str] = {}
    for s, digest in zip(samples, content_hashes(samples)):
        if digest in first:
            a, b = sorted((find(first[digest]), find(s.patient)))
            parent[b] = a
        else:
            first[digest] = s.patient
    return [s if find(s.patient) == s.patient else Sample(s.path, s.label, find(s.patient), s.source) for s in samples]


def without_duplicated_tests(split: Split) -> tuple[Split, list[str]]:
    """``split`` with every test film whose content (sha256) is also on its train or select side taken off the test
    side (a lock made before :func:`same_content_same_patient` could hold one), and the entries removed."""
    from dataclasses import replace

    others = split.samples("train") + split.samples("select")
    seen = set(content_hashes(others))
    tests = split.samples("test")
    removed = [e for e, d in zip(split.test, content_hashes(tests)) if d in seen]
    return replace(split, test=tuple(e for e in split.test if e not in set(removed))), removed


def lock_split(sources: Sequence[tuple[Source, LockShares]], out: Path, *, seed: int = 0) -> Split:
    """Read each source's films (with their patients), lock them (:func:`make_locked_split`) and write the split
    to ``out``; returns it."""
    split = make_locked_split([(src, source_samples(src), shares) for src, shares in sources], seed=seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    split.save(out)
    return split


def side_summary(split: Split, side: str) -> str:
    """One line on a split's side: its films, then per source Normal/Pneumonia films and patients."""
    samples = split.samples(side)
    by_source: dict[str, tuple[list[int], set[str]]] = {}
    for s in samples:
        counts, patients = by_source.setdefault(s.source, ([0, 0], set()))
        counts[s.label] += 1
        patients.add(s.patient)
    text = ", ".join(f"{k} {c[0]}N/{c[1]}P ({len(p)} patients)" for k, (c, p) in sorted(by_source.items()))
    return f"{side:<6} {len(samples):>5} films: {text}"


def _cache_key(paths: Sequence[Path]) -> str:
    key = hashlib.sha256()
    for p in paths:
        st = p.stat()
        key.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()[:20]


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _decode_all(paths: Sequence[Path], work, *, workers: int | None, progress: bool) -> None:
    with ThreadPoolExecutor(max_workers=workers or (os.cpu_count() or 2)) as pool:
        it = pool.map(work, range(len(paths)))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(paths), desc="decode", unit="img")
        for _ in it:
            pass


def load_images(
    paths: Sequence[Path], *, cache_dir: Path | None = None, workers: int | None = None, progress: bool = False
) -> np.ndarray:
    """Decode images through the contract into one ``(N, 224, 224, 1)`` uint8 array.

    With ``cache_dir``, the array is stored as ``.npy`` keyed by the paths,
    sizes and modification times, so reruns skip decoding.

    Raises:
        InvalidInputError: An image cannot be decoded (training data must be clean).
        NotAssessableError: An image breaks a pixel or eligibility rule (:func:`load_assessable` skips those).
    """
    cache = (cache_dir / f"images-{_cache_key(paths)}.npy") if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    out = np.empty((len(paths), *contract.IMAGE_SHAPE), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = imaging.preprocess(paths[i])

    _decode_all(paths, work, workers=workers, progress=progress)
    if cache is not None:
        _save_npy(cache, out)
    return out


def load_assessable(paths: Sequence[Path], *, cache_dir: Path | None = None, workers: int | None = None,
                    progress: bool = False) -> tuple[np.ndarray, list[int], list[dict]]:
    """Like :func:`load_images`, but a film the contract refuses (not assessable) or cannot read is left out and
    reported instead of ending the run: returns (images of the kept films, their indexes, the refused films as
    ``{"index", "path", "status", "rule", "reason"}``). Real archives hold such films (a blank exposure, a
    truncated file); one of them must not end a training run. With ``cache_dir`` the kept images and the refusals
    are cached together."""
    from cxr.core.errors import InvalidInputError, NotAssessableError

    key = _cache_key(paths) if cache_dir else ""
    cache = (cache_dir / f"assessable-{key}.npy") if cache_dir else None
    if cache is not None and cache.exists() and cache.with_suffix(".json").exists():
        meta = json.loads(cache.with_suffix(".json").read_text())
        return np.load(cache), list(meta["kept"]), list(meta["refused"])
    if cache_dir is not None and (cache_dir / f"images-{key}.npy").exists():  # decoded whole before: none refused
        return np.load(cache_dir / f"images-{key}.npy"), list(range(len(paths))), []
    out = np.empty((len(paths), *contract.IMAGE_SHAPE), dtype=np.uint8)
    refusals: dict[int, dict] = {}

    def work(i: int) -> None:
        p = paths[i]
        try:
            out[i] = imaging.preprocess(p)
        except NotAssessableError as exc:
            refusals[i] = {"index": i, "path": str(p), "status": contract.Status.NOT_ASSESSABLE.value,
                           "rule": exc.rule, "reason": str(exc).splitlines()[0]}
        except InvalidInputError as exc:
            refusals[i] = {"index": i, "path": str(p), "status": contract.Status.ERROR.value, "rule": None,
                           "reason": str(exc).splitlines()[0]}

    _decode_all(paths, work, workers=workers, progress=progress)
    kept = [i for i in range(len(paths)) if i not in refusals]
    x = out[kept] if refusals else out
    refused = [refusals[i] for i in sorted(refusals)]
    if cache is not None:
        _save_npy(cache, x)
        cache.with_suffix(".json").write_text(json.dumps({"kept": kept, "refused": refused}) + "\n")
    return x, kept, refused


def load_samples(samples: Sequence[Sample], *, cache_dir: Path | None = None, progress: bool = False,
                 what: str = "") -> tuple[np.ndarray, list[Sample], list[dict]]:
    """The images of ``samples`` that the contract accepts, the samples they belong to, and the refused ones
    (:func:`load_assessable`, each with its ``source``). Each refusal is logged with its file and rule, and a
    summary counts them per source, so a blank film in a 4,000-film archive is named, not fatal."""
    x, kept, refused = load_assessable([s.path for s in samples], cache_dir=cache_dir, progress=progress)
    for r in refused:
        r["source"] = samples[r["index"]].source
        logger.warning("%sskipped %s (%s): %s", f"{what}: " if what else "", r["path"], r["status"], r["reason"])
    if refused:
        counts: dict[str, int] = defaultdict(int)
        for r in refused:
            counts[r["source"]] += 1
        logger.warning("%s%d of %d films refused by the pixel rules and skipped: %s", f"{what}: " if what else "",
                       len(refused), len(samples), dict(sorted(counts.items())))
    return x, [samples[i] for i in kept], refused


def provenance_rows(role: str, samples: Sequence[Sample]) -> list[dict]:
    """One provenance row per sample: role, source, patient, label, path (repository-relative) and sha256."""
    from cxr.core.integrity import sha256_file
    from cxr.core.paths import relative

    if role not in PROVENANCE_ROLES:
        raise ValueError(f"unknown provenance role {role!r}")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        digests = list(pool.map(sha256_file, [s.path for s in samples]))
    return [
        {"role": role, "source": s.source, "patient": s.patient, "label": contract.LABELS[s.label],
         "path": relative(s.path), "sha256": d}
        for s, d in zip(samples, digests)
    ]


def provenance_summary(rows: Sequence[dict]) -> dict:
    """Counts by role, source and label, and patients by role and source (for the model card)."""
    out: dict = {}
    for r in rows:
        cell = out.setdefault(r["role"], {}).setdefault(r["source"], {"images": 0, "patients": set(), "labels": {}})
        cell["images"] += 1
        cell["patients"].add(r["patient"])
        cell["labels"][r["label"]] = cell["labels"].get(r["label"], 0) + 1
    for role in out.values():
        for cell in role.values():
            cell["patients"] = len(cell["patients"])
    return out
