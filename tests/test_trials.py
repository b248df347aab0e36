"""Trials: a worker's trials share one MobileNetV2 base per input size, and each starts as a new model would."""

import random

import numpy as np

from conftest import TINY
from mobiletune import data, objectives, scan, trials
from mobiletune import model as model_lib
from mobiletune.config import from_flat, load_config
from mobiletune.recipe import seed_everything


def _weights(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]


def test_trial_models_share_a_base_and_start_as_a_new_model_would(cats_dogs_tiny, tmp_path):
    config = load_config(overrides=TINY)
    images = data.load_images(cats_dogs_tiny, config.data)
    shared = trials.Shared(config, images, [config.phase2.fine_tune_at], scan.FileIndex(None), tmp_path,
                           objectives.Objectives())
    imagenet = model_lib.base_of(shared.extractor(config.data.image_size)).get_weights()

    seed_everything(config.data.seed)
    first = shared.trial_model(config)
    model_lib.base_of(first).set_weights([w + 1 for w in imagenet])  # what a trial's fine-tuning does to it
    seed_everything(config.data.seed)
    second = shared.trial_model(config)
    state_after_reuse = random.getstate()

    seed_everything(config.data.seed)  # the same trial built from scratch, as before bases were shared
    fresh = model_lib.build_model(from_flat({**config.flat(), "model.weights": "none"}), len(images.classes))
    model_lib.base_of(fresh).set_weights(imagenet)

    assert model_lib.base_of(second) is model_lib.base_of(first)  # built once
    assert random.getstate() == state_after_reuse  # the generator left where building the base leaves it
    for reused, new in zip(_weights(second), _weights(fresh), strict=True):
        np.testing.assert_array_equal(reused, new)  # ImageNet base again, and the same initial head
