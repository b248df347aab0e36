"""What goes into and comes out of every model mobiletune makes, in NumPy alone (no TensorFlow to import).

In: RGB pixels 0-255, scaled to MobileNetV2's [-1, 1] inside the model (the Rescaling layer) or, for the
frozen pass that starts below it, by `to_unit`. Out: logits. Two classes have one logit z, as in the seed
(binary cross-entropy); it stands for the two logits (0, z), whose softmax is exactly
(1 - sigmoid(z), sigmoid(z)), so every export and every score sees [n, classes].
"""

from __future__ import annotations

import numpy as np

PIXEL_SCALE = 127.5  # pixels 0-255 -> [-1, 1]: x / 127.5 - 1, as MobileNetV2 was trained


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """Float32 pixels 0-255 -> [-1, 1], what the model's Rescaling layer computes."""
    return pixels / np.float32(PIXEL_SCALE) - np.float32(1)


def two_logits(values: np.ndarray) -> np.ndarray:
    """A binary model's logits (or its logit layer's kernel or bias), last axis 1, as the two classes' (0, z);
    anything with more than one logit as it is."""
    if values.shape[-1] != 1:
        return values
    return np.concatenate([np.zeros_like(values), values], axis=-1)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Pooled features scaled to length 1 (float32), as everything compares them: by angle, not by size (an
    all-zero row stays zero)."""
    rows = np.array(features, dtype=np.float32)  # one copy, scaled in place: at 200,000 images each is 1 GB
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return rows
