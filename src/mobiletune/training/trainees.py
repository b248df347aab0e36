"""Trainees: what trains in each phase on cached features, compiled once and reused by a sweep's trials.

A trainee is the part of the classifier above the feature cache: the head on pooled features (phase 1), or
the base from `fine_tune_at` on and the head, on boundary activations (phase 2). Compiling one and tracing
its training and validation steps took ~0.3 s of each phase-1 fit and ~0.9 s of each phase-2 fit on
flowers_mini, more than the epochs themselves: a quarter of a small sweep. So a trainee has a head of its own
(its dropout rate in variables), loaded from the classifier before a phase and written back to it after
every epoch, and holds the base's layers above the cut as they are. Trials of one base, cut, head and
optimizer then share one trainee and its traced steps, whatever their learning rate, dropout or epochs.
A run trains a fresh one the same way: the numbers are those of the classifier's own layers, to the bit.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import keras
import numpy as np

from mobiletune.config import Config
from mobiletune.model import cut
from mobiletune.model import network as model_lib
from mobiletune.model.network import Classifier

__all__ = ["RateDropout", "Trainee", "Trainees"]


class RateDropout(keras.layers.Layer):
    """`keras.layers.Dropout` with its rate in variables, so one traced step serves every rate. The same
    random draws and arithmetic as Dropout(rate) on TensorFlow, which keeps `x * float32(1 / (1 - rate))`
    where a uniform draw >= rate: bit for bit the same outputs and gradients (tests/test_trainees.py)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(0)  # its state is the classifier's (`Trainee.load`)
        self.rate = self.add_weight(shape=(), initializer="zeros", trainable=False, name="rate")
        self.scale = self.add_weight(shape=(), initializer="ones", trainable=False, name="scale")

    def set_rate(self, rate: float) -> None:
        self.rate.assign(rate)
        self.scale.assign(1 / (1 - rate))  # in Python's float64, then float32: as TensorFlow scales by a float rate

    def call(self, x, training=None):
        import tensorflow as tf

        if not training:
            return x
        kept = keras.random.uniform(tf.shape(x), seed=self.seed_generator) >= self.rate
        return tf.where(kept, x * self.scale, 0.0)

    def compute_output_shape(self, input_shape):
        return input_shape


@dataclass
class Trainee:
    """A compiled trainee, its own head (dense layer and dropout, if the classifier has one) and the
    optimizer's variables as built, to start each phase from."""

    model: keras.Model
    dense: keras.layers.Dense
    dropout: RateDropout | None
    fresh_optimizer: list[np.ndarray] = field(default_factory=list)
    loaded: weakref.ref | None = None  # the Keras model of the classifier loaded last, which `store` writes back
    # to: not kept alive, and not its `Classifier`, which a caller may make for the call alone

    def load(self, classifier: Classifier, lr: float) -> None:
        """Take `classifier`'s head and dropout draws, with a fresh optimizer at `lr`."""
        for mine, theirs in zip(self.dense.variables, classifier.logits.variables, strict=True):
            mine.assign(theirs)
        if self.dropout is not None:
            theirs = classifier.dropout
            self.dropout.set_rate(theirs.rate)
            self.dropout.seed_generator.state.assign(theirs.seed_generator.state)
        for variable, value in zip(self.model.optimizer.variables, self.fresh_optimizer, strict=True):
            variable.assign(value)
        self.model.optimizer.learning_rate = lr
        self.loaded = weakref.ref(classifier.model)

    def store(self) -> None:
        """Write the trained head and the dropout draws made back to the classifier loaded."""
        model = self.loaded() if self.loaded is not None else None
        assert model is not None, "store() before load()"
        classifier = Classifier(model)
        for mine, theirs in zip(self.dense.variables, classifier.logits.variables, strict=True):
            theirs.assign(mine)
        if self.dropout is not None:
            classifier.dropout.seed_generator.state.assign(self.dropout.seed_generator.state)

    def syncing(self) -> keras.callbacks.Callback:
        """A callback that stores after every epoch, before the callbacks that save or test the classifier."""
        return keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: self.store())


class Trainees:
    """A worker's trainees by what their traced steps depend on, the `KEEP` most recently used."""

    KEEP = 24  # the default space: 5 sizes x 4 cuts in phase 2, and phase 1

    def __init__(self):
        self._kept: OrderedDict[tuple, tuple[keras.Model | None, Trainee]] = OrderedDict()

    def get(self, phase: int, classifier: Classifier, config: Config) -> Trainee:
        """The trainee for `classifier` in `phase` (its trainable flags set for it), loaded from it."""
        key, base = _key(phase, classifier, config)
        trainee = self._kept.pop(key, (None, None))[1]
        if trainee is None:
            trainee = build(phase, classifier, config)
        self._kept[key] = (base, trainee)  # the base held, so its id in the key cannot name another one
        while len(self._kept) > self.KEEP:
            self._kept.popitem(last=False)
        trainee.load(classifier, config.phase_lr(phase))
        return trainee


def _key(phase: int, classifier: Classifier, config: Config) -> tuple[tuple, keras.Model | None]:
    # the batch size too: a step traced for other batches has its batch dimension relaxed, another graph
    common = (phase, classifier.logits.units, classifier.dropout.rate > 0, config.phase_optimizer(phase),
              config.data.batch_size)
    if phase == 1:
        return (*common, classifier.pool.output.shape[-1]), None
    base = classifier.base
    # the layers above the cut are the base's own, trainable as they are now (`set_trainable`)
    return (*common, id(base), config.phase2.fine_tune_at, tuple(v.trainable for v in base.variables)), base


def build(phase: int, classifier: Classifier, config: Config) -> Trainee:
    """A new trainee for `classifier` in `phase`, compiled with a fresh optimizer; not loaded."""
    dense = keras.layers.Dense.from_config({**classifier.logits.get_config(), "name": "trainee_logits",
                                            "kernel_initializer": "zeros", "bias_initializer": "zeros"})
    dropout = RateDropout(name="trainee_dropout") if classifier.dropout.rate > 0 else None

    def head(x):
        return dense(dropout(x) if dropout is not None else x)

    if phase == 1:
        pooled = keras.Input(classifier.pool.output.shape[1:], name="pooled")
        model = keras.Model(pooled, head(pooled), name="head")
    else:
        pool = type(classifier.pool).from_config({**classifier.pool.get_config(), "name": "trainee_pool"})
        model = cut.top_model(classifier, config.phase2.fine_tune_at, head=lambda x: head(pool(x)))
    model_lib.compile_fresh(model, config.phase_optimizer(phase), config.phase_lr(phase))
    return Trainee(model, dense, dropout, [np.array(v) for v in model.optimizer.variables])
