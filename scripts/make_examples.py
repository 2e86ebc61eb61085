"""Build examples/ (a handful of small real films under their licences) from ../shared/data.

    .venv/bin/python scripts/make_examples.py

The folder is committed; this script records how it was made. Kaggle films are
train-split originals (Kermany et al. 2018, CC BY 4.0) downscaled to a longest
side of 1024 px; NIH films are ChestX-ray14 PNGs (Wang et al. 2017, NIH Clinical
Center, unrestricted use with citation) as shipped in ../shared at 512 px; the
DICOM is built from one NIH film with made-up patient fields; the non-chest
image is scikit-image's ``camera`` (public domain, shipped in the package).
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.core.integrity import sha256_file

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "examples"

KAGGLE = {  # file in chest_xray_fullres -> class folder
    "IM-0117-0001.jpeg": "NORMAL", "IM-0178-0001.jpeg": "NORMAL", "IM-0230-0001.jpeg": "NORMAL",
    "person1003_virus_1685.jpeg": "PNEUMONIA", "person1068_bacteria_3002.jpeg": "PNEUMONIA",
    "person1141_virus_1890.jpeg": "PNEUMONIA",
}
#: The locks whose test patients no example may be: an example is run by tests and shown in the README, so a locked
#: test film there would be a test film read again and again.
LOCKS = (REPO / "docs" / "model" / "locked" / "split.json", REPO / "docs" / "model" / "adult_lock" / "split.json")


def nih_film(cls: str) -> Path:
    """The first film (sorted) of a class of chest_xray_adult_site whose patient trains under every lock."""
    import json

    train = [{e.split("/", 1)[1] for e in json.loads(lock.read_text())["train"] if e.startswith("nih/")}
             for lock in LOCKS if lock.exists()]
    for src in sorted((SHARED / "chest_xray_adult_site" / cls).glob("*.png")):
        if all(f"{cls}/{src.name}" in side for side in train):
            return src
    raise SystemExit(f"no NIH {cls} film trains under every lock")


def chest_dicom(pixels: np.ndarray) -> bytes:
    """A DX chest radiograph instance with made-up patient fields and a device (for the metrics by device)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dx
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["cxr-examples-instance"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = dx, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["cxr-examples-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["cxr-examples-series"])
    ds.PatientName, ds.PatientID, ds.PatientSex = "Example^Patient", "EXAMPLE-0001", "O"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Manufacturer, ds.StationName = "ExampleVendor", "EXAMPLE-DR1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def main() -> int:
    if not SHARED.is_dir():
        print(f"{SHARED} not found: examples/ is built from the shared data", file=sys.stderr)
        return 2
    rows = []
    for name, cls in KAGGLE.items():
        img = Image.open(SHARED / "chest_xray_fullres" / cls / name).convert("L")
        img.thumbnail((1024, 1024), Image.LANCZOS)
        (OUT / cls).mkdir(parents=True, exist_ok=True)
        img.save(OUT / cls / name, quality=88)
        rows.append((f"{cls}/{name}", cls, "Kaggle chest-xray-pneumonia (Kermany et al. 2018), train split", "CC BY 4.0"))
    nih_files = {}
    for old in [*OUT.glob("NORMAL/nih_*.png"), *OUT.glob("PNEUMONIA/nih_*.png")]:
        old.unlink()
    for cls in ("NORMAL", "PNEUMONIA"):
        src = nih_film(cls)
        (OUT / cls / f"nih_{src.name}").write_bytes(src.read_bytes())
        nih_files[cls] = src
        rows.append((f"{cls}/nih_{src.name}", cls, "NIH ChestX-ray14 (Wang et al. 2017)", "unrestricted use, with citation"))
    dcm = OUT / "dicom" / "chest_dx.dcm"
    dcm.parent.mkdir(exist_ok=True)
    dcm.write_bytes(chest_dicom(np.asarray(Image.open(nih_files["NORMAL"]).convert("L"))))
    rows.append(("dicom/chest_dx.dcm", "NORMAL", f"built from NIH film {nih_files['NORMAL'].name}; made-up patient fields",
                 "unrestricted use, with citation"))
    from skimage import data

    (OUT / "not_chest").mkdir(exist_ok=True)
    Image.fromarray(data.camera()).save(OUT / "not_chest" / "camera.png")
    rows.append(("not_chest/camera.png", "", "scikit-image data.camera", "public domain"))
    with (OUT / "MANIFEST.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "label", "source", "licence", "sha256"])
        for path, label, source, licence in rows:
            w.writerow([path, label, source, licence, sha256_file(OUT / path)])
    print(f"wrote {len(rows)} files into {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
