"""Model architectures (``cxr train --arch ...``).

Every model takes the contract's pixels as ``float32`` in 0..255, shape
``(N, 224, 224, 1)``, and outputs the pneumonia *logit* ``(N, 1)`` from a
layer named ``logit``, followed by a ``probability`` sigmoid layer. Intensity
scaling lives in the graph (:class:`IntensityNormalization`), so exported
models take raw pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers

from cxr.core import contract
from cxr.core.errors import CxrError

logger = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="cxr")
class IntensityNormalization(layers.Layer):
    """Scale 0..255 pixels to [0, 1], then optionally standardise each image.

    Per-image standardisation (zero mean, unit variance over the image) removes
    exposure and contrast differences between sites, the main shift between the
    Kaggle train and test distributions.
    """

    def __init__(self, *, standardize: bool = True, epsilon: float = 1e-3, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.standardize = standardize
        self.epsilon = epsilon

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32") * (1.0 / 255.0)
        if not self.standardize:
            return x
        mean = self._mean(x)
        var = self._mean(keras.ops.square(x - mean))
        return (x - mean) / keras.ops.sqrt(var + self.epsilon**2)

    @staticmethod
    def _mean(x):
        # Rows first, then columns: two short float32 sums are accurate in every runtime. One
        # 50,176-term sum is not (onnxruntime's ReduceMean drifted 4e-5 from TensorFlow's,
        # enough to break 1e-5 export parity after the network amplified it).
        return keras.ops.mean(keras.ops.mean(x, axis=(2, 3), keepdims=True), axis=1, keepdims=True)

    def get_config(self) -> dict:
        return {**super().get_config(), "standardize": self.standardize, "epsilon": self.epsilon}


def _head(x, *, dropout: float, dense_units: int):
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    logit = layers.Dense(1, name="logit")(x)
    return layers.Activation("sigmoid", name="probability", dtype="float32")(logit)


def _conv_bn(x, filters: int, *, kernel: int = 3, strides: int = 1, name: str, weight_decay: float):
    x = layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_regularizer=keras.regularizers.L2(weight_decay) if weight_decay else None,
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_compact(*, dropout: float = 0.3, weight_decay: float = 1e-4, width: int = 16) -> keras.Model:
    """Compact CNN for CPU screening throughput (the default).

    A 4x4 stride-4 stem brings 224 px to 56 px; then stages of 3x3
    convolutions (BN, ReLU) at 56, 28, 14 and 7 px with widths 2w, 4w, 8w, 16w
    (one convolution at 56 px, two elsewhere) and max-pooling between them;
    global average pooling, Dense(128, relu), dropout, the logit. About 0.14
    GMAC per image at the default ``width=16`` (InceptionV3: 2.85), 1.2 M
    parameters. The shape was chosen by measured training speed on 2 CPU cores
    (about 48 images/s), so that a full run fits in 30 minutes.
    """
    inputs = keras.Input(shape=contract.IMAGE_SHAPE, dtype="float32", name=contract.INPUT_NAME)
    x = IntensityNormalization(name="intensity")(inputs)
    x = _conv_bn(x, width, kernel=4, strides=4, name="stem", weight_decay=weight_decay)
    for i, mult in enumerate((2, 4, 8, 16)):
        x = _conv_bn(x, width * mult, name=f"s{i}a", weight_decay=weight_decay)
        if i > 0:
            x = _conv_bn(x, width * mult, name=f"s{i}b", weight_decay=weight_decay)
        if i < 3:
            x = layers.MaxPooling2D(2, name=f"s{i}_pool")(x)
    outputs = _head(x, dropout=dropout, dense_units=128)
    return keras.Model(inputs, outputs, name="compact_cnn")


def build_inception_v3(*, weights: str | Path | None = None, dropout: float = 0.0) -> keras.Model:
    """The report's model: InceptionV3 base, GAP, Dense(128, relu), Dense(1, sigmoid), 224x224x3.

    The grayscale contract input is scaled to [0, 1] (the report's scaling;
    no per-image standardisation) and replicated to three channels in the graph.

    Args:
        weights: Optional local weights file for the base (e.g. the Keras
            ImageNet ``*_notop.h5``). When given, the base is frozen as in the
            report; otherwise the whole network trains from scratch (nothing is
            downloaded).
        dropout: Dropout before the logit (the report used none).
    """
    from keras.applications import InceptionV3

    inputs = keras.Input(shape=contract.IMAGE_SHAPE, dtype="float32", name=contract.INPUT_NAME)
    x = IntensityNormalization(standardize=False, name="intensity")(inputs)
    x = layers.Concatenate(axis=-1, name="to_rgb")([x, x, x])
    base = InceptionV3(include_top=False, weights=None, input_shape=(contract.IMAGE_SIZE, contract.IMAGE_SIZE, 3))
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise CxrError(f"weights file not found: {path}")
        base.load_weights(str(path))
        base.trainable = False
        logger.info("InceptionV3 base loaded from %s and frozen", path)
    x = base(x, training=False if weights is not None else None)
    outputs = _head(x, dropout=dropout, dense_units=128)
    return keras.Model(inputs, outputs, name="inception_v3")


#: EfficientNet-Lite0 (Tan and Le, 2019; the "lite" variant: ReLU6, no squeeze-excitation, fixed stem and head):
#: per stage (repeats, kernel, stride, expansion, output channels).
EFFICIENTNET_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                             (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
#: Blocks of EfficientNet-Lite0 (the sum of the stages' repeats).
EFFICIENTNET_LITE0_BLOCKS = sum(s[0] for s in EFFICIENTNET_LITE0_STAGES)
#: Batch-normalisation epsilon of the ImageNet weights (the TensorFlow original's).
_BN_EPSILON = 1e-3


def _bn_relu6(x, name: str, *, relu: bool = True):
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=0.99, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x


def build_efficientnet_lite0(*, weights: str | Path | None = None, train_from_block: int = 6,
                             dropout: float = 0.2) -> keras.Model:
    """EfficientNet-Lite0 on the contract's grayscale input, with the shared head (GAP, Dense(128), the logit).

    The grayscale pixels are scaled to [-1, 1] in the graph, the scaling of the ImageNet weights (checked by
    ``cxr import-weights``, which classifies natural images with both scalings). The stem takes one channel: the
    converted stem kernel is the sum of its three colour kernels, exactly the response to a grey image repeated
    over red, green and blue. 0.39 GMAC per film at 224 px, 3.5 M parameters with the head.

    Args:
        weights: The converted ImageNet weights (``cxr import-weights``, an ``.npz`` of arrays by layer); without
            them every layer trains from scratch (nothing is downloaded).
        train_from_block: With weights, the stem and blocks ``0 .. train_from_block - 1`` are frozen (their
            batch-norm statistics too); the later blocks, the 1x1 head convolution and the new head train.
        dropout: Dropout before the logit.
    """
    if not 0 <= train_from_block <= EFFICIENTNET_LITE0_BLOCKS:
        raise CxrError(f"train_from_block must be in 0..{EFFICIENTNET_LITE0_BLOCKS}, got {train_from_block}")
    inputs = keras.Input(shape=contract.IMAGE_SHAPE, dtype="float32", name=contract.INPUT_NAME)
    x = IntensityNormalization(standardize=False, name="intensity")(inputs)
    x = layers.Rescaling(2.0, offset=-1.0, name="to_signed")(x)
    frozen: list[str] = []

    def conv(y, filters: int, kernel: int, strides: int, name: str):
        return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(y)

    x = _bn_relu6(conv(x, 32, 3, 2, "stem_conv"), "stem")
    frozen += ["stem_conv", "stem_bn"]
    block = 0
    channels = 32
    for repeats, kernel, stride, expand, out in EFFICIENTNET_LITE0_STAGES:
        for r in range(repeats):
            name = f"b{block}"
            strides = stride if r == 0 else 1
            y = x
            if expand != 1:
                y = _bn_relu6(conv(y, channels * expand, 1, 1, f"{name}_expand_conv"), f"{name}_expand")
            y = layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(y)
            y = _bn_relu6(y, f"{name}_dw")
            y = _bn_relu6(conv(y, out, 1, 1, f"{name}_project_conv"), f"{name}_project", relu=False)
            if strides == 1 and channels == out:
                y = layers.Add(name=f"{name}_add")([x, y])
            if block < train_from_block:
                frozen += [f"{name}_{part}" for part in ("expand_conv", "expand_bn", "dw", "dw_bn", "project_conv",
                                                         "project_bn") if expand != 1 or not part.startswith("expand")]
            x, channels, block = y, out, block + 1
    x = _bn_relu6(conv(x, 1280, 1, 1, "head_conv"), "head")
    outputs = _head(x, dropout=dropout, dense_units=128)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0")
    if weights is not None:
        load_converted_weights(model, weights)
        for layer_name in frozen:
            model.get_layer(layer_name).trainable = False
        logger.info("EfficientNet-Lite0 ImageNet weights from %s; stem and blocks 0-%d frozen", weights,
                    train_from_block - 1)
    return model


def load_converted_weights(model: keras.Model, path: str | Path) -> int:
    """Set every layer named in the ``.npz`` written by :func:`cxr.train.pretrained.convert` (arrays
    ``LAYER/0``, ``LAYER/1`` ... in the layer's weight order); returns the number of layers set.

    Raises:
        CxrError: The file is missing, or a layer or a shape does not match.
    """
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise CxrError(f"weights file not found: {p} (convert the ImageNet weights with `cxr import-weights`)")
    arrays = np.load(p)
    by_layer: dict[str, dict[int, np.ndarray]] = {}
    for key in arrays.files:
        layer_name, _, index = key.rpartition("/")
        by_layer.setdefault(layer_name, {})[int(index)] = arrays[key]
    for layer_name, parts in by_layer.items():
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            raise CxrError(f"{p}: layer {layer_name!r} is not in {model.name}") from None
        values = [parts[i] for i in range(len(parts))]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise CxrError(f"{p}: layer {layer_name!r} has shapes {[v.shape for v in values]}, expected {expected}")
        layer.set_weights(values)
    return len(by_layer)


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "compact": build_compact,
    "inception_v3": build_inception_v3,
    "efficientnet_lite0": build_efficientnet_lite0,
}


def build(arch: str, **kwargs: object) -> keras.Model:
    """Build a model by architecture name (see :data:`ARCHITECTURES`)."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise CxrError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}") from None
    return factory(**kwargs)


def logit_model(model: keras.Model) -> keras.Model:
    """The same network ending at its ``logit`` layer (for temperature scaling)."""
    return keras.Model(model.inputs, model.get_layer("logit").output, name=f"{model.name}_logit")
