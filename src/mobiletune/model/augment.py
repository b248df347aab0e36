"""Augmentation: the tutorial's random flip and rotation inside the model, and the same layers applied with
per-image draws for the feature cache, so a cached view is the one the model would have seen."""

from __future__ import annotations

import functools

import keras
import numpy as np

from mobiletune import internals
from mobiletune.config import Config


def build_augmentation(config: Config, seed: int | None = None) -> keras.Sequential:
    """The tutorial's augmentation; seeded so one seed gives the same views."""
    a, seed = config.augment, config.data.seed if seed is None else seed
    layers = []
    if a.flip != "none":
        layers.append(keras.layers.RandomFlip(a.flip, seed=seed, name="flip"))  # named: checkpoint paths
    if a.rotation > 0:
        layers.append(keras.layers.RandomRotation(a.rotation, seed=seed + 1, name="rotation"))
    return keras.Sequential(layers, name="augment")


def view_draws(config: Config, digests: list[str], view: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's flip and rotation angle (degrees) for augmented view `view`, drawn from
    (data.seed, its sha256, view) alone: a view does not depend on where the image sits in a
    split or batch, so it survives re-splits and is computed once."""
    a = config.augment
    flips, angles = np.zeros(len(digests), bool), np.zeros(len(digests), np.float32)
    for i, digest in enumerate(digests):
        rng = np.random.default_rng([config.data.seed, int(digest[:16], 16), view])
        flips[i] = rng.random() <= 0.5  # RandomFlip's rule
        angles[i] = rng.uniform(-a.rotation * 360.0, a.rotation * 360.0)  # RandomRotation's range and unit
    return flips, angles


@functools.cache
def view_augmenter(flip: str, rotation: float) -> ViewAugmenter:
    """One augmenter (and one traced graph) per setting, however many feature passes use it."""
    return ViewAugmenter(flip, rotation)


class ViewAugmenter:
    """The model's own RandomFlip and RandomRotation, applied with per-image draws (`view_draws`)
    instead of the layers' batch-wide generator."""

    def __init__(self, flip: str, rotation: float):
        import tensorflow as tf

        self.flip = keras.layers.RandomFlip(flip) if flip != "none" else None
        self.rotate = keras.layers.RandomRotation(rotation) if rotation > 0 else None
        self._apply = tf.function(self._graph, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.float32), tf.TensorSpec([None], tf.bool),
            tf.TensorSpec([None], tf.float32)])

    def __call__(self, pixels: np.ndarray, flips: np.ndarray, angles: np.ndarray) -> np.ndarray:
        return self._apply(pixels, flips, angles).numpy()

    def _graph(self, x, flips, angles):
        import tensorflow as tf

        shape = tf.shape(x)
        if self.flip is not None:
            x = self.flip.transform_images(x, {"flips": tf.reshape(flips, [-1, 1, 1, 1]), "input_shape": shape})
        if self.rotate is not None:
            n = shape[0]
            matrix = internals.rotation_matrix(self.rotate, angles, shape[1], shape[2])
            x = self.rotate.transform_images(x, {"rotation_matrix": matrix, "angle": angles, "image_height": shape[1],
                                                 "image_width": shape[2], "batch_size": n})
        return x
