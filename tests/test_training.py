"""Training: `train_phase`, which serves phase 1, phase 2 and every sweep trial (end to end: tests/test_recipe.py)."""

import numpy as np
import pytest

from mobiletune.training.loop import Phase, train_phase
from mobiletune.training.state import RunState


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_train_phase_traces_its_step_without_making_variables(optimizer):
    """Optimizer slots made inside the first traced step make tf.function trace the step twice."""
    import keras
    import tensorflow as tf

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs))
    rng = np.random.default_rng(0)
    batches = tf.data.Dataset.from_tensor_slices((rng.normal(size=(10, 8)).astype("float32"),
                                                  rng.integers(0, 2, 10))).batch(4)
    made_in_a_trace = []

    def creator(next_creator, **kwargs):
        if tf.inside_function():
            made_in_a_trace.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        history = train_phase(model, batches, batches, Phase(1, 0, 0, 2, optimizer, 1e-3, 3), RunState())
    assert len(history) == 2 and made_in_a_trace == []


def test_phase_1_passes_enough_times_to_take_min_steps():
    """The seed's own data keeps its 10 epochs of one pass (2,000 images at batch 32: 63 steps a pass); a small
    folder passes over its images several times an epoch, up to phase1.min_steps; 0 is the seed's exact recipe."""
    from mobiletune.config import load_config

    config = load_config()
    assert config.phase1.min_steps == 630 and config.passes_per_epoch(1, 63) == 1
    assert config.passes_per_epoch(1, 5) == 13 and config.passes_per_epoch(1, 1) == 63  # flowers_mini; 2 images
    assert config.passes_per_epoch(2, 5) == 1  # fine-tuning is counted in epochs
    assert load_config(overrides=["phase1.min_steps=0"]).passes_per_epoch(1, 5) == 1
    assert load_config(overrides=["phase1.epochs=0"]).passes_per_epoch(1, 5) == 1


def test_an_epoch_of_three_passes_trains_as_three_epochs_of_one(cats_dogs_tiny, tmp_path):
    """Pass p draws its order and views from (seed, p) whichever epoch holds it: 1 epoch of 3 passes
    (phase1.min_steps) leaves the weights 3 epochs of one pass leave, before and after fine-tuning."""
    import numpy as np

    from conftest import TINY
    from mobiletune.config import load_config
    from mobiletune.model import network as model_lib
    from mobiletune.training.run import train_and_evaluate

    passes = train_and_evaluate(load_config(overrides=[*TINY, "phase1.min_steps=9"]), cats_dogs_tiny, tmp_path / "a")
    epochs = train_and_evaluate(load_config(overrides=[*TINY, "phase1.epochs=3"]), cats_dogs_tiny, tmp_path / "b")
    assert passes.metrics["schedule"] == {"passes_per_epoch": 3, "phase1_steps_per_epoch": 9,
                                          "phase2_steps_per_epoch": 3}
    assert [r["phase"] for r in passes.history] == [1, 2] and [r["phase"] for r in epochs.history] == [1, 1, 1, 2]
    for name in ("before_fine_tuning.keras", "model.keras"):
        a, b = (model_lib.load_model(run / name).get_weights() for run in (tmp_path / "a", tmp_path / "b"))
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), name
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "Phase 1: 1 epoch(s), each 3 pass(es) over the training images in 9 optimizer steps" in summary
    assert "phase1.min_steps=9" in summary
