"""What each phase's epochs are made of: optimizer steps, passes over the training images, the class weights,
and the batches, in an order drawn from (seed, pass) alone so that a resumed run sees what an unbroken one
would."""

from __future__ import annotations

import numpy as np

from mobiletune.config import Config
from mobiletune.data import pixels
from mobiletune.data.images import ImageSet
from mobiletune.features.compute import Features
from mobiletune.features.dataset import feature_dataset


def class_weights(images: ImageSet, config: Config) -> dict[int, float] | None:
    """With data.class_weight "auto": scikit-learn's 'balanced' weights from the training split."""
    if config.data.class_weight == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    y = images.labels[images.indices("train")]
    classes = np.arange(len(images.classes))
    return {int(c): float(w) for c, w in zip(classes, compute_class_weight("balanced", classes=classes, y=y),
                                             strict=True)}


def steps_per_pass(images: ImageSet, config: Config) -> int:
    """Optimizer steps in one pass over the training images."""
    return -(-len(images.indices("train")) // config.data.batch_size)


def steps_per_epoch(images: ImageSet, config: Config, phase: int) -> int:
    """Optimizer steps in one epoch of `phase`: `Config.passes_per_epoch` passes."""
    steps = steps_per_pass(images, config)
    return config.passes_per_epoch(phase, steps) * steps


def _first_pass(epoch: int, images: ImageSet, config: Config) -> int:
    """The pass over the training images that `epoch` (counted from 0 over both phases) starts with: each of
    phase 1's epochs makes `Config.passes_per_epoch` passes, each of phase 2's one. Each pass has its own
    order and views, drawn from (seed, pass)."""
    per_epoch, phase1 = config.passes_per_epoch(1, steps_per_pass(images, config)), config.phase1.epochs
    return epoch * per_epoch if epoch <= phase1 else phase1 * per_epoch + epoch - phase1


def phase_data(phase: int, images: ImageSet, feats: Features | None, config: Config, initial_epoch: int,
               end_epoch: int):
    """Training and validation batches for `phase`: pixels for the full model, or the cached features the
    part above them trains on (pooled in phase 1, the boundary activations in phase 2).

    Either way each pass's order depends on (seed, pass) alone (`_first_pass`), so resuming at `initial_epoch`
    is exact.
    """
    batch, seed = config.data.batch_size, config.data.seed
    initial_pass, end_pass = _first_pass(initial_epoch, images, config), _first_pass(end_epoch, images, config)
    if feats is None:
        size = config.data.image_size
        return (pixels.pixel_dataset(images, "train", size, batch, shuffle=True, seed=seed,
                                     initial_epoch=initial_pass, epochs=end_pass),
                pixels.pixel_dataset(images, "validation", size, batch, shuffle=False, seed=seed))
    outputs = [0] if phase == 1 else feats.boundaries[config.phase2.fine_tune_at]
    labels = {s: images.labels[images.indices(s)] for s in ("train", "validation")}
    return (feature_dataset(feats.readers["train"], outputs, labels["train"], feats.views["train"], batch,
                            shuffle=True, seed=seed, initial_epoch=initial_pass, epochs=end_pass),
            feature_dataset(feats.readers["validation"], outputs, labels["validation"], 1, batch,
                            shuffle=False, seed=seed))
