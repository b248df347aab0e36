"""Training: `train_phase`, which serves phase 1, phase 2 and every sweep trial (end to end: tests/test_recipe.py)."""

import numpy as np
import pytest

from mobiletune.training import train_phase


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
        history = train_phase(model, batches, batches, phase=1, epochs=2, initial_epoch=0, optimizer=optimizer,
                              lr=1e-3, steps=3)
    assert len(history) == 2 and made_in_a_trace == []
