"""A corpus of inputs that are *not* frontal chest X-rays, for validating refusals.

Nothing here is downloaded. Each item comes from one of three kinds of source:

* ``generated``: blanks, gradients, noise, rendered text pages and terminal
  screenshots, synthetic charts and UI screenshots, colour photographs-like
  images, skin- and fundus-like colour images (always available; used by the
  tests).
* ``installed``: real images that ship inside installed packages:
  scikit-image's sample photographs (cameraman, moon, coins, astronaut, coffee,
  a retina fundus, a CT phantom, histology ...), matplotlib's sample data (a
  portrait and an MR brain slice), and ``pydicom-data``'s test files (MR, CT,
  ultrasound, palette colour, secondary capture, a tibia radiograph), both as
  DICOM files (the header rules) and as their pixels saved as PNG (the pixel
  rules and the learned score, as when a PACS export drops the headers).
* ``real_xray``: chest X-rays from a local labelled folder made unjudgeable
  (inverted, rotated 90 and 180 degrees), when such a folder is given.

Every item has a category; :func:`build` returns them in a fixed order.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

logger = logging.getLogger(__name__)

#: Categories in report order.
CATEGORIES = (
    "blank", "gradient", "noise", "text", "screenshot", "colour_photo", "skin_fundus", "natural_gray",
    "other_modality", "other_radiograph", "dicom_header", "inverted_xray", "rotated_xray",
)


@dataclass(frozen=True)
class Item:
    """One corpus input.

    Attributes:
        category: One of :data:`CATEGORIES`.
        name: Unique, human-readable name.
        data: Encoded file bytes (PNG, JPEG or DICOM).
        origin: ``generated``, ``installed`` or ``real_xray``.
    """

    category: str
    name: str
    data: bytes
    origin: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}")
        if not self.data:
            raise ValueError(f"{self.name}: empty data")


def _png(img: Image.Image | np.ndarray) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


_WORDS = ("patient", "report", "findings", "impression", "the", "of", "and", "lorem", "ipsum", "dolor", "sit", "amet",
          "screening", "study", "result", "normal", "within", "limits", "page", "signed", "date", "total", "invoice")


def _text_page(rng: np.random.Generator, *, size: tuple[int, int], dark: bool, font_px: int) -> Image.Image:
    bg, fg = ((12, 200) if dark else (245, 20))
    img = Image.new("L", size, bg)
    d = ImageDraw.Draw(img)
    font = _font(font_px)
    y = font_px
    while y < size[1] - font_px:
        words = " ".join(rng.choice(_WORDS, size=int(rng.integers(4, 14))))
        d.text((font_px, y), words, fill=fg, font=font)
        y += int(font_px * 1.6)
    return img


def generated(seed: int = 0) -> Iterator[Item]:
    """Synthetic inputs (always available)."""
    rng = np.random.default_rng(seed)
    for size in ((224, 224), (512, 512), (1024, 800), (2000, 1800)):
        for level in (0, 128, 255):
            yield Item("blank", f"blank_{level}_{size[0]}x{size[1]}", _png(np.full(size[::-1], level, np.uint8)), "generated")
        noisy = np.clip(128 + rng.normal(0, 1.5, size[::-1]), 0, 255).astype(np.uint8)
        yield Item("blank", f"near_constant_{size[0]}x{size[1]}", _png(noisy), "generated")
    h = w = 512
    yy, xx = np.mgrid[0:h, 0:w] / 511.0
    for name, g in (("horizontal", xx), ("vertical", yy), ("diagonal", (xx + yy) / 2),
                    ("radial", np.clip(1 - np.hypot(xx - 0.5, yy - 0.5) * 1.6, 0, 1)),
                    ("rings", 0.5 + 0.5 * np.sin(np.hypot(xx - 0.5, yy - 0.5) * 40)),
                    ("stripes", 0.5 + 0.5 * np.sin(xx * 60))):
        yield Item("gradient", f"gradient_{name}", _png((g * 255).astype(np.uint8)), "generated")
    for i in range(6):
        yield Item("noise", f"uniform_noise_{i}", _png(rng.integers(0, 256, (400, 400), dtype=np.uint8)), "generated")
        gauss = np.clip(128 + rng.normal(0, 50, (400, 400)), 0, 255).astype(np.uint8)
        yield Item("noise", f"gaussian_noise_{i}", _png(gauss), "generated")
        blobs = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).resize((512, 512), Image.Resampling.BICUBIC)
        yield Item("noise", f"smooth_noise_{i}", _png(blobs.filter(ImageFilter.GaussianBlur(6))), "generated")
        sp = np.where(rng.random((400, 400)) < 0.1, 255, 0).astype(np.uint8)
        yield Item("noise", f"salt_pepper_{i}", _png(sp), "generated")
    for i in range(8):
        size = ((850, 1100), (1100, 850), (640, 480), (1240, 1754))[i % 4]
        page = _text_page(rng, size=size, dark=i % 3 == 2, font_px=int(rng.integers(12, 28)))
        if i % 2:  # a scanned page: slight blur, grain and a grey cast
            arr = np.asarray(page.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
            page = Image.fromarray(np.clip(arr * 0.9 + 10 + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8))
        yield Item("text", f"text_page_{i}", _jpeg(page) if i % 2 else _png(page), "generated")
    for i in range(6):
        yield Item("screenshot", f"ui_screenshot_{i}", _png(_ui_screenshot(rng, gray=i % 2 == 1)), "generated")
    for i in range(6):
        yield Item("colour_photo", f"colour_scene_{i}", _jpeg(_colour_scene(rng)), "generated")
    for i in range(4):
        yield Item("skin_fundus", f"skin_like_{i}", _jpeg(_skin(rng)), "generated")
        yield Item("skin_fundus", f"fundus_like_{i}", _jpeg(_fundus(rng)), "generated")


def _ui_screenshot(rng: np.random.Generator, *, gray: bool) -> Image.Image:
    w, h = 1280, 800
    img = Image.new("RGB", (w, h), (240, 240, 242))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 40], fill=(40, 44, 52))
    d.rectangle([0, 40, 220, h], fill=(225, 228, 232))
    font = _font(16)
    for i in range(12):
        d.text((16, 60 + 30 * i), " ".join(rng.choice(_WORDS, 2)), fill=(30, 30, 30), font=font)
    for i in range(4):  # cards with a bar chart each
        x0, y0 = 250 + (i % 2) * 510, 70 + (i // 2) * 360
        d.rectangle([x0, y0, x0 + 480, y0 + 330], fill=(255, 255, 255), outline=(200, 200, 200))
        colour = tuple(int(c) for c in rng.integers(40, 220, 3))
        for b in range(10):
            bh = int(rng.integers(20, 260))
            d.rectangle([x0 + 20 + 45 * b, y0 + 310 - bh, x0 + 50 + 45 * b, y0 + 310], fill=colour)
        d.text((x0 + 12, y0 + 8), " ".join(rng.choice(_WORDS, 3)), fill=(20, 20, 20), font=font)
    return img.convert("L") if gray else img


def _colour_scene(rng: np.random.Generator) -> Image.Image:
    w, h = 800, 600
    sky = np.linspace(0, 1, h)[:, None, None] * np.array(rng.uniform(60, 200, 3)) + np.array(rng.uniform(20, 120, 3))
    arr = np.broadcast_to(sky, (h, w, 3)).copy()
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(25):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 120)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(2))


def _skin(rng: np.random.Generator) -> Image.Image:
    h, w = 600, 600
    base = np.array([200, 150, 120], dtype=np.float64) * rng.uniform(0.6, 1.1)
    tex = np.asarray(Image.fromarray(rng.integers(0, 256, (60, 60), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC),
                     dtype=np.float64)[..., None] / 255.0
    arr = base * (0.8 + 0.4 * tex)
    yy, xx = np.mgrid[0:h, 0:w]
    lesion = np.hypot(xx - w * rng.uniform(0.3, 0.7), yy - h * rng.uniform(0.3, 0.7)) < rng.uniform(40, 120)
    arr[lesion] *= np.array([0.45, 0.3, 0.25])
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))


def _fundus(rng: np.random.Generator) -> Image.Image:
    s = 640
    img = Image.new("RGB", (s, s), (0, 0, 0))
    d = ImageDraw.Draw(img)
    d.ellipse([30, 30, s - 30, s - 30], fill=(int(rng.integers(150, 220)), int(rng.integers(60, 100)), 20))
    cx, cy = s * rng.uniform(0.55, 0.7), s * 0.5
    for _ in range(10):
        ang = rng.uniform(0, 2 * np.pi)
        pts = [(cx, cy)]
        for k in range(1, 8):
            ang += rng.normal(0, 0.25)
            pts.append((cx + np.cos(ang) * 40 * k, cy + np.sin(ang) * 40 * k))
        d.line(pts, fill=(120, 20, 10), width=int(rng.integers(3, 8)))
    d.ellipse([cx - 45, cy - 45, cx + 45, cy + 45], fill=(250, 220, 150))
    return img.filter(ImageFilter.GaussianBlur(2))


# -- installed sources ---------------------------------------------------------------------------------------------

_SKIMAGE = {
    "natural_gray": ("camera.png", "moon.png", "coins.png", "horse.png", "page.png", "text.png", "clock_motion.png",
                     "brick.png", "grass.png", "gravel.png", "cell.png", "chessboard_GRAY.png", "hubble_deep_field.jpg",
                     "motorcycle_left.png"),
    "colour_photo": ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "ihc.png", "color.png", "logo.png"),
    "skin_fundus": ("retina.jpg", "microaneurysms.png"),
    "other_modality": ("phantom.png",),
}

#: pydicom-data files (not chest radiographs) by category.
_PYDICOM = {
    "other_modality": ("MR_small.dcm", "CT_small.dcm", "MR2_UNCR.dcm", "emri_small.dcm", "liver.dcm", "US1_UNCR.dcm",
                       "gdcm-US-ALOKA-16.dcm", "eCT_Supplemental.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"),
    "colour_photo": ("OT-PAL-8-face.dcm", "SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm"),
    "other_radiograph": ("RG3_UNCR.dcm",),
}


def _skimage_dir() -> Path | None:
    try:
        import skimage.data
    except ImportError:
        return None
    return Path(skimage.data.__file__).parent


def _pydicom_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    roots = []
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    try:
        import pydicom

        roots.append(Path(pydicom.__file__).parent / "data" / "test_files")
    except ImportError:
        pass
    for root in roots:
        if root.is_dir():
            for f in root.glob("*.dcm"):
                found.setdefault(f.name, f)
    return found


def _dicom_pixels_png(path: Path) -> bytes | None:
    """The first frame of a DICOM file as an 8-bit PNG (min-max windowed), as a header-less export would be."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception:  # noqa: BLE001 - an undecodable test file is just left out
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    elif photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo or min(arr.shape[:2]) < 32:
        return None
    return _png(((arr - lo) * 255.0 / (hi - lo)).astype(np.uint8))


def installed() -> Iterator[Item]:
    """Real non-chest images shipped inside installed packages (skipped silently per missing package; see :func:`sources`)."""
    sk = _skimage_dir()
    if sk is not None:
        for category, names in _SKIMAGE.items():
            for n in names:
                p = sk / n
                if p.exists():
                    yield Item(category, f"skimage_{p.stem}", p.read_bytes(), "installed")
        faces = sk / "lfw_subset.npy"
        if faces.exists():
            arr = np.load(faces)
            for i in range(0, min(len(arr), 40), 4):  # 25x25 faces, upscaled to a plausible photo size
                face = Image.fromarray((arr[i] * 255).astype(np.uint8)).resize((250, 250), Image.Resampling.BICUBIC)
                yield Item("natural_gray", f"skimage_lfw_face_{i}", _png(face), "installed")
    try:
        import matplotlib

        sample = Path(matplotlib.get_data_path()) / "sample_data"
        if (sample / "grace_hopper.jpg").exists():
            yield Item("colour_photo", "mpl_grace_hopper", (sample / "grace_hopper.jpg").read_bytes(), "installed")
            hopper_gray = Image.open(sample / "grace_hopper.jpg").convert("L")
            yield Item("natural_gray", "mpl_grace_hopper_gray", _png(hopper_gray), "installed")
        if (sample / "s1045.ima.gz").exists():  # a 256x256 16-bit MR brain slice
            raw = np.frombuffer(gzip.decompress((sample / "s1045.ima.gz").read_bytes()), np.uint16).reshape(256, 256)
            mr = ((raw - raw.min()) * (255.0 / max(1, int(raw.max()) - int(raw.min())))).astype(np.uint8)
            yield Item("other_modality", "mpl_mr_brain", _png(mr), "installed")
        if (sample / "Minduka_Present_Blue_Pack.png").exists():
            yield Item("colour_photo", "mpl_minduka", (sample / "Minduka_Present_Blue_Pack.png").read_bytes(), "installed")
    except ImportError:
        pass
    dcm = _pydicom_files()
    for category, names in _PYDICOM.items():
        for n in names:
            if n not in dcm:
                continue
            yield Item("dicom_header", f"pydicom_{Path(n).stem}.dcm", dcm[n].read_bytes(), "installed")
            png = _dicom_pixels_png(dcm[n])
            if png is not None:
                yield Item(category, f"pydicom_{Path(n).stem}_pixels", png, "installed")


def real_xray_variants(folder: Path, *, limit: int = 40, seed: int = 0) -> Iterator[Item]:
    """Chest X-rays from ``folder`` (a labelled ``{NORMAL,PNEUMONIA}`` folder) inverted and rotated."""
    files = sorted(Path(folder).rglob("*.jpeg"))
    if not files:
        return
    rng = np.random.default_rng(seed)
    pick = [files[i] for i in sorted(rng.choice(len(files), size=min(limit, len(files)), replace=False))]
    for f in pick:
        img = Image.open(f).convert("L")
        yield Item("inverted_xray", f"inverted_{f.stem}", _png(255 - np.asarray(img)), "real_xray")
        yield Item("rotated_xray", f"rot90_{f.stem}", _png(img.transpose(Image.Transpose.ROTATE_90)), "real_xray")
        yield Item("rotated_xray", f"rot180_{f.stem}", _png(img.transpose(Image.Transpose.ROTATE_180)), "real_xray")


def sources() -> dict[str, bool]:
    """Which optional sources are installed (the report says which were used)."""
    return {"scikit-image": _skimage_dir() is not None, "pydicom-data": bool(_pydicom_files()),
            "matplotlib": _has("matplotlib")}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def build(*, xray_folder: Path | None = None, include_installed: bool = True, seed: int = 0) -> list[Item]:
    """The whole corpus in a fixed order: generated, installed, then real X-ray variants."""
    items = list(generated(seed))
    if include_installed:
        items += list(installed())
    if xray_folder is not None:
        items += list(real_xray_variants(xray_folder, seed=seed))
    names = [i.name for i in items]
    if len(names) != len(set(names)):
        raise ValueError("corpus item names must be unique")
    return items
