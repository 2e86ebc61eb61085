"""Datasets in the Kaggle layout, patient-grouped splits and the decoded-image cache.

Layout: ``<root>/<split>/{NORMAL,PNEUMONIA}/*`` (``split`` = train, val, test)
or, for a single labelled sample such as the deployment-site set,
``<root>/{NORMAL,PNEUMONIA}/*``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr import contract
from cxr.errors import DataError

logger = logging.getLogger(__name__)

_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL2 = re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE)
_IM = re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE)


def patient_id(filename: str) -> str:
    """Patient (or series) id encoded in a Kaggle file name.

    ``person1000_bacteria_2931.jpeg`` -> ``person1000``;
    ``IM-0115-0001.jpeg`` -> ``IM-0115``; ``NORMAL2-IM-0381-0001.jpeg`` ->
    ``NORMAL2-IM-0381`` (IM- and NORMAL2-IM- are kept apart as separate
    series). Any other name is its own patient (its stem).
    """
    stem = Path(filename).name
    for pattern in (_PERSON, _NORMAL2, _IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return Path(stem).stem


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: File path.
        label: Class index (0 Normal, 1 Pneumonia).
        patient: Patient id from the file name.
    """

    path: Path
    label: int
    patient: str

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label}")


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
    """A patient-grouped train/validation split, reproducible from its file."""

    seed: int
    val_fraction: float
    train: tuple[str, ...]
    val: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON (relative paths)."""
        payload = {"seed": self.seed, "val_fraction": self.val_fraction, "train": list(self.train), "val": list(self.val)}
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        """Read a split written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls(int(d["seed"]), float(d["val_fraction"]), tuple(d["train"]), tuple(d["val"]))


def make_split(samples: Sequence[Sample], *, root: Path, val_fraction: float = 0.15, seed: int = 0) -> Split:
    """Split samples into train and validation by patient, stratified by class.

    Every patient's images land on one side. Within each class, patients are
    shuffled with ``seed`` and moved to validation until the class's
    validation share reaches ``val_fraction`` of its images.
    """
    by_patient: dict[tuple[int, str], list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[(s.label, s.patient)].append(s)
    rng = random.Random(seed)
    val_keys: set[tuple[int, str]] = set()
    for label in (0, 1):
        keys = sorted(k for k in by_patient if k[0] == label)
        rng.shuffle(keys)
        target = val_fraction * sum(len(by_patient[k]) for k in keys)
        taken = 0
        for k in keys:
            if taken >= target:
                break
            val_keys.add(k)
            taken += len(by_patient[k])
    patients_val = {k[1] for k in val_keys}
    train: list[str] = []
    val: list[str] = []
    for s in samples:
        rel = str(s.path.relative_to(root))
        (val if s.patient in patients_val else train).append(rel)
    return Split(seed, val_fraction, tuple(sorted(train)), tuple(sorted(val)))


def load_images(
    paths: Sequence[Path], *, cache_dir: Path | None = None, workers: int | None = None, progress: bool = False
) -> np.ndarray:
    """Decode images through the contract into one ``(N, 224, 224, 1)`` uint8 array.

    With ``cache_dir``, the array is stored as ``.npy`` keyed by the paths,
    sizes and modification times, so reruns skip decoding.

    Raises:
        InvalidInputError: An image cannot be decoded (training data must be clean).
    """
    key = hashlib.sha256()
    for p in paths:
        st = p.stat()
        key.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = (cache_dir / f"images-{key.hexdigest()[:20]}.npy") if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    out = np.empty((len(paths), *contract.IMAGE_SHAPE), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = contract.preprocess(paths[i])

    with ThreadPoolExecutor(max_workers=workers or (os.cpu_count() or 2)) as pool:
        it = pool.map(work, range(len(paths)))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(paths), desc="decode", unit="img")
        for _ in it:
            pass
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    return out


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Balanced class weights ``n / (2 * n_c)`` (the 1:2.9 imbalance of Kaggle train)."""
    labels = np.asarray(labels)
    n = len(labels)
    weights = {}
    for c in (0, 1):
        n_c = int((labels == c).sum())
        if n_c == 0:
            raise DataError(f"class {contract.LABELS[c]} has no training images")
        weights[c] = n / (2.0 * n_c)
    return weights
