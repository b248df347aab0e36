"""MobileNetV2's own ImageNet top (the 1,000-class Dense layer the fine-tuned model replaces): what the
base network itself calls an image, read from the pooled features the feature store already holds."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobiletune.config import Config

# Keras publishes MobileNetV2 weights trained at each of these sizes; other sizes get the 224 ones.
KERAS_SIZES = (96, 128, 160, 192, 224)
Top = tuple[np.ndarray, np.ndarray]  # the Dense layer's kernel [1280, 1000] and bias [1000]
HIERARCHY = Path(__file__).with_name("imagenet_hierarchy.txt")  # scripts/generate-imagenet-hierarchy


@dataclass(frozen=True)
class Hierarchy:
    """WordNet's nouns above the 1,000 ImageNet classes ("tabby" is a "cat", a "feline", ..., an "entity")."""

    names: tuple[str, ...]  # each noun's first word ("domestic_cat")
    depths: np.ndarray  # [nouns] steps below "entity" on the longest path
    members: np.ndarray  # [1000, nouns] float32: 1 where the noun is the class or one of its hypernyms


@functools.cache
def hierarchy() -> Hierarchy:
    """The nouns of `HIERARCHY`: its noun lines (wnid, depth, name), then after "---" a line per class."""
    lines = [line for line in HIERARCHY.read_text().splitlines() if not line.startswith("#")]
    split = lines.index("---")
    assert len(lines) - split - 1 == 1000, f"{HIERARCHY}: not one line per ImageNet class"
    nouns = [line.split() for line in lines[:split]]
    members = np.zeros((len(lines) - split - 1, len(nouns)), np.float32)
    for row, line in enumerate(lines[split + 1:]):
        members[row, [int(k) for k in line.split()]] = 1.0
    return Hierarchy(tuple(n[2] for n in nouns), np.array([int(n[1]) for n in nouns]), members)


@functools.cache
def _with_top(alpha: float, rows: int) -> tuple[Top, np.ndarray] | None:
    """The top of Keras' weight file with the top at `rows` px, and that network's first convolution kernel
    (to tell which base it belongs to); None when the file cannot be had."""
    import warnings

    import keras

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.applications.MobileNetV2(include_top=True, weights="imagenet", alpha=alpha,
                                                   input_shape=(rows, rows, 3))
    except Exception:  # noqa: BLE001 - offline without the file, or a width Keras has no top for: do without
        return None
    kernel, bias = model.get_layer("predictions").get_weights()
    return (kernel.astype(np.float32), bias.astype(np.float32)), model.get_layer("Conv1").get_weights()[0]


def top_for(config: Config, base) -> Top | None:
    """The ImageNet top of `base` (the run's MobileNetV2, `Classifier.base`, as loaded), or None (other weights,
    or no file with a top to be had).

    Keras trained a network at each size, so the top must come from the same one as the base: the 224 file is
    tried first (it is what offline copies hold, and it needs no download when it matches), then the base's
    own size. A top whose first convolution differs from the base's would read another network's features.
    """
    if config.model.weights != "imagenet":
        return None
    size = config.data.image_size
    conv = base.get_layer("Conv1").get_weights()[0]
    for rows in dict.fromkeys((224, size if size in KERAS_SIZES else 224)):
        found = _with_top(config.model.alpha, rows)
        if found is not None and np.array_equal(found[1], conv):
            return found[0]
    return None


def imagenet_probabilities(pooled: np.ndarray, top: Top) -> np.ndarray:
    """The 1,000 ImageNet class probabilities of each row of pooled base features."""
    import scipy.special

    kernel, bias = top
    return scipy.special.softmax(pooled.astype(np.float32) @ kernel + bias, axis=1)
