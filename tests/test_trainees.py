"""Trainees: a reused trainee trains a classifier exactly as a new one does, and its dropout is Keras'."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from mobiletune.config import load_config
from mobiletune.model import cut
from mobiletune.model.cut import extractor
from mobiletune.model.network import create_model
from mobiletune.training import trainees
from mobiletune.training.loop import Phase, seed_everything, train_phase
from mobiletune.training.state import RunState


@pytest.mark.parametrize("rate", [0.2, 0.0105, 0.496])
def test_rate_dropout_is_keras_dropout_to_the_bit(rate):
    """The same kept units, the same scaling and the same gradients, draw after draw, from the same state."""
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 64)).astype("float32"))
    theirs, mine = keras.layers.Dropout(rate, seed=7), trainees.RateDropout()
    mine.set_rate(rate)
    mine.seed_generator.state.assign(theirs.seed_generator.state)
    for _ in range(2):  # the second draw continues from the state the first left
        results = []
        for layer in (theirs, mine):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * tf.range(64, dtype=tf.float32))
            results.append((y.numpy(), tape.gradient(loss, x).numpy()))
        (y_theirs, g_theirs), (y_mine, g_mine) = results
        assert np.array_equal(y_theirs, y_mine) and np.array_equal(g_theirs, g_mine)
        assert 0 < (y_mine == 0).mean() < 1
    assert np.array_equal(mine(x, training=False), x)


def _train(classifier, config, phase: int, kept: trainees.Trainees, data) -> list[dict]:
    classifier.set_trainable(phase, config)
    trainee = kept.get(phase, classifier, config)
    return train_phase(trainee.model, data[phase], data[phase], _phase(phase, config), RunState(),
                       callbacks=[trainee.syncing()], compiled=True)


def _phase(number: int, config) -> Phase:
    """Two epochs of three steps from epoch 0, at the phase's rate."""
    return Phase(number, 0, 0, 2, "rmsprop", config.phase_lr(number), 3)


def _config(*overrides: str):
    return load_config(overrides=[*TINY, "data.image_size=64", "phase2.fine_tune_at=140", *overrides])


def _classifier(config, base=None):
    seed_everything(0)
    return create_model(config, 3, base=base)


def _data(classifier) -> dict[int, tf.data.Dataset]:
    """Random pooled features (phase 1) and the two boundary activations at 140 (phase 2), with labels."""
    extract, where = extractor(classifier, [140])
    outputs = extract(np.random.default_rng(1).uniform(-1, 1, (12, 64, 64, 3)).astype("float32"))
    y = np.arange(12) % 3
    return {1: tf.data.Dataset.from_tensor_slices((outputs[0], y)).batch(4),
            2: tf.data.Dataset.from_tensor_slices((tuple(outputs[i] for i in where[140]), y)).batch(4)}


def test_a_reused_trainee_trains_as_a_new_one():
    """Trial B on the trainees trial A compiled and traced (the same base, as a sweep's trials of one size
    share it; another learning rate and dropout) ends with the weights, history and dropout draws of
    trial B on new trainees."""
    config_a, config_b = _config("phase1.lr=0.003", "model.dropout=0.3"), _config("phase1.lr=0.0005",
                                                                                  "model.dropout=0.1")
    first = _classifier(config_a)
    base, data = first.base, _data(first)
    untrained = base.get_weights()
    kept = trainees.Trainees()
    for phase in (1, 2):
        _train(first, config_a, phase, kept, data)
    trained_a = first.model.get_weights()
    second = _classifier(config_b, base=base)
    base.set_weights(untrained)
    again = _classifier(config_b)
    again.model.set_weights(second.model.get_weights())
    again.dropout.seed_generator.state.assign(second.dropout.seed_generator.state)
    results = []
    for classifier, cache in ((second, kept), (again, trainees.Trainees())):
        history = [row for phase in (1, 2) for row in _train(classifier, config_b, phase, cache, data)]
        results.append((history, classifier.model.get_weights(),
                        keras.ops.convert_to_numpy(classifier.dropout.seed_generator.state)))
    assert len(kept._kept) == 2  # trial B's trainees were trial A's
    (history_reused, weights_reused, seed_reused), (history_new, weights_new, seed_new) = results
    seconds = [{"seconds": row["seconds"]} for row in history_reused]
    assert history_reused == [{**row, **s} for row, s in zip(history_new, seconds, strict=True)]
    assert all(np.array_equal(a, b) for a, b in zip(weights_reused, weights_new, strict=True))
    assert np.array_equal(seed_reused, seed_new)
    assert not all(np.array_equal(a, b) for a, b in zip(trained_a, weights_new, strict=True))


def test_trainees_are_kept_apart_by_what_their_steps_depend_on():
    classifier, kept = _classifier(_config()), trainees.Trainees()
    for phase, overrides in [(1, []), (2, []), (2, ["phase2.fine_tune_at=120"]), (2, ["phase2.optimizer=adam"]),
                             (1, ["phase1.lr=0.1", "phase2.lr_ratio=0.5"])]:
        config = _config(*overrides)
        classifier.set_trainable(phase, config)
        kept.get(phase, classifier, config)
    assert len(kept._kept) == 4  # a learning rate is not traced; a cut or an optimizer is


def test_a_trainee_trains_as_the_classifier_own_layers_did():
    """Both phases through a trainee (its own head, RateDropout) against the classifier's own dropout and
    head (`Classifier.head`, `cut.top_model`): the same history and weights, to the bit."""
    config = _config("model.dropout=0.3")
    results = []
    for through_trainee in (True, False):
        classifier = _classifier(config)
        data = _data(classifier)
        history = []
        for phase in (1, 2):
            if through_trainee:
                history += _train(classifier, config, phase, trainees.Trainees(), data)
                continue
            classifier.set_trainable(phase, config)
            if phase == 1:
                pooled = keras.Input(classifier.pool.output.shape[1:])
                own = keras.Model(pooled, classifier.head(pooled))
            else:
                own = cut.top_model(classifier, 140)
            history += train_phase(own, data[phase], data[phase], _phase(phase, config), RunState())
        results.append(([{**row, "seconds": 0} for row in history], classifier.model.get_weights()))
    (history_trainee, weights_trainee), (history_own, weights_own) = results
    assert history_trainee == history_own
    assert all(np.array_equal(a, b) for a, b in zip(weights_trainee, weights_own, strict=True))
