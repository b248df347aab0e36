"""MobileNetV2's own ImageNet top (the 1,000-class Dense layer the fine-tuned model replaces): what the
base network itself calls an image, read from the pooled features the feature store already holds."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def imagenet_top(alpha: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The top's (kernel [1280, 1000], bias [1000]) for width `alpha`, from Keras' weight file with the top (its
    ordinary download, or $KERAS_HOME/models offline); None when that file cannot be had."""
    import warnings

    import keras

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.applications.MobileNetV2(include_top=True, weights="imagenet", alpha=alpha)
    except Exception:  # noqa: BLE001 - offline without the file, or a width Keras has no top for: do without
        return None
    kernel, bias = model.get_layer("predictions").get_weights()
    return kernel.astype(np.float32), bias.astype(np.float32)


def imagenet_probabilities(pooled: np.ndarray, top: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The 1,000 ImageNet class probabilities of each row of pooled base features."""
    import scipy.special

    kernel, bias = top
    return scipy.special.softmax(pooled.astype(np.float32) @ kernel + bias, axis=1)


def top_for(config) -> tuple[np.ndarray, np.ndarray] | None:
    """The ImageNet top matching the run's base, or None: with other weights the top would read other features."""
    return imagenet_top(config.model.alpha) if config.model.weights == "imagenet" else None
