"""In-graph, batched data augmentation for ``tf.data``.

Geometric: the report's ImageDataGenerator settings as one projective warp per
image (rotation, width/height shift, shear, zoom, optional horizontal flip).
Photometric (for robustness to the train/test site shift): random gamma,
contrast, brightness, Gaussian blur and noise. Works on float32 pixels in
0..255, shape ``(N, H, W, 1)``, before the model's own intensity scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation ranges.

    Attributes:
        rotation_deg: Max absolute rotation in degrees (report: 20).
        shift: Max shift as a fraction of width/height (report: 0.2).
        shear: Max shear factor (report: 0.2; Keras' ImageDataGenerator read
            it as degrees, which is a no-op, so it is taken here as a factor).
        zoom: Scale range ``[1 - zoom, 1 + zoom]`` per axis (report: 0.2).
        flip: Random horizontal flip (report: on; it mirrors the heart).
        photometric: Gamma, contrast, brightness, blur and noise.
        acquisition: What differs between hospitals' films beside the
            patient: collimation borders and crops (black or white bands on
            random sides), burned-in markers and text (small bright blocks near
            the edges), and a wider gamma and exposure range.
    """

    rotation_deg: float = 20.0
    shift: float = 0.2
    shear: float = 0.2
    zoom: float = 0.2
    flip: bool = True
    photometric: bool = True
    acquisition: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rotation_deg <= 180:
            raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}")
        for name in ("shift", "shear", "zoom"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")


def _affine_matrices(batch: tf.Tensor, height: int, width: int, cfg: AugmentConfig) -> tf.Tensor:
    """Per-image output->input projective transforms, shape ``(N, 8)``."""
    n = batch
    u = lambda lo, hi: tf.random.uniform([n], lo, hi)  # noqa: E731
    theta = u(-1.0, 1.0) * (cfg.rotation_deg * math.pi / 180.0)
    shear = u(-cfg.shear, cfg.shear)
    zx, zy = u(1.0 - cfg.zoom, 1.0 + cfg.zoom), u(1.0 - cfg.zoom, 1.0 + cfg.zoom)
    tx, ty = u(-cfg.shift, cfg.shift) * width, u(-cfg.shift, cfg.shift) * height
    flip = tf.where(u(0.0, 1.0) < 0.5, -1.0, 1.0) if cfg.flip else tf.ones([n])
    cos, sin = tf.cos(theta), tf.sin(theta)
    # A = R(theta) @ Shear @ diag(flip / zx, 1 / zy): maps centred output coords to input coords.
    a00 = cos * flip / zx
    a01 = (cos * shear - sin) / zy
    a10 = sin * flip / zx
    a11 = (sin * shear + cos) / zy
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    b0 = cx - a00 * cx - a01 * cy + tx
    b1 = cy - a10 * cx - a11 * cy + ty
    zeros = tf.zeros([n])
    return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)


def _gaussian_blur(images: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Separable 5-tap Gaussian blur with one sigma per batch."""
    x = tf.range(-2.0, 3.0)
    k = tf.exp(-0.5 * tf.square(x / sigma))
    k = k / tf.reduce_sum(k)
    kx = tf.reshape(k, [1, 5, 1, 1])
    ky = tf.reshape(k, [5, 1, 1, 1])
    out = tf.nn.conv2d(images, kx, strides=1, padding="SAME")
    return tf.nn.conv2d(out, ky, strides=1, padding="SAME")


def _acquisition(x: tf.Tensor) -> tf.Tensor:
    """Borders and burned-in markers on 0..1 images ``(N, H, W, 1)``."""
    n = tf.shape(x)[0]
    h, w = x.shape[1], x.shape[2]
    rows = tf.cast(tf.range(h), tf.float32)[None, :, None, None] / h
    cols = tf.cast(tf.range(w), tf.float32)[None, None, :, None] / w
    u = lambda lo, hi: tf.random.uniform([n, 1, 1, 1], lo, hi)  # noqa: E731
    # collimation / crop bands: each side with probability 0.25, up to 12% of the side, black or white
    border = tf.zeros_like(x, dtype=tf.bool)
    for coord, flip in ((rows, False), (rows, True), (cols, False), (cols, True)):
        depth = tf.where(u(0.0, 1.0) < 0.25, u(0.0, 0.12), tf.zeros([n, 1, 1, 1]))
        c = 1.0 - coord if flip else coord
        border = tf.logical_or(border, c < depth)
    fill = tf.where(u(0.0, 1.0) < 0.7, tf.zeros([n, 1, 1, 1]), tf.ones([n, 1, 1, 1]))
    x = tf.where(border, fill, x)
    # burned-in markers: up to two bright blocks (a side marker, a text line) in the outer fifth
    for _ in range(2):
        on = u(0.0, 1.0) < 0.5
        bh, bw = u(0.02, 0.06), u(0.03, 0.2)
        top = tf.where(u(0.0, 1.0) < 0.5, u(0.0, 0.15), u(0.8, 0.94))
        left = u(0.0, 0.8)
        block = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw) & on
        x = tf.where(block, u(0.85, 1.0), x)
    return x


def augment_batch(images: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """Augment a batch of float32 0..255 images ``(N, H, W, 1)``; returns the same shape and range."""
    shape = tf.shape(images)
    n = shape[0]
    height, width = images.shape[1], images.shape[2]
    if cfg.rotation_deg or cfg.shift or cfg.shear or cfg.zoom or cfg.flip:
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=_affine_matrices(n, height, width, cfg),
            output_shape=tf.stack([height, width]),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="NEAREST",
        )
    if cfg.photometric:
        x = images / 255.0
        lo, hi = (0.5, 2.0) if cfg.acquisition else (0.7, 1.5)
        gamma = tf.exp(tf.random.uniform([n, 1, 1, 1], math.log(lo), math.log(hi)))
        x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), gamma)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        contrast = tf.random.uniform([n, 1, 1, 1], 0.7, 1.3)
        brightness = tf.random.uniform([n, 1, 1, 1], -0.1, 0.1)
        x = (x - mean) * contrast + mean + brightness
        if tf.random.uniform([]) < 0.3:
            x = _gaussian_blur(x, tf.random.uniform([], 0.5, 1.2))
        noise_sd = tf.random.uniform([n, 1, 1, 1], 0.0, 0.03)
        x = x + tf.random.normal(tf.shape(x)) * noise_sd
        images = tf.clip_by_value(x, 0.0, 1.0) * 255.0
    if cfg.acquisition:
        images = _acquisition(images / 255.0) * 255.0
    return images
