"""The network: raw pixels -> augmentation -> [-1, 1] -> MobileNetV2 -> pooled -> logits.

Preprocessing lives inside the model, so training, predict and every export see the same
input: RGB pixels 0-255 at the trained size. The augmentation layers are inactive at inference.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import keras
import numpy as np

from mobiletune.config import BASE_LAYERS, Config
from mobiletune.errors import ModelError
from mobiletune.quiet import drop_retracing_warnings

drop_retracing_warnings()  # every module that runs a model imports this one

BASE_NAME = "mobilenetv2"
INPUT_NAME = "pixels"


def build_base(config: Config) -> keras.Model:
    """MobileNetV2 without its top, with the configured weights: the ordinary Keras path."""
    size, m = config.data.image_size, config.model
    weights = {"imagenet": "imagenet", "none": None}.get(m.weights)
    try:
        with warnings.catch_warnings():
            # At a size Keras has no file for (not 96-224 in steps of 32) it warns that it loads the 224 weights;
            # without the top, its convolution weights serve any size: nothing for the user to act on
            warnings.filterwarnings("ignore", "`input_shape` is undefined or non-square", UserWarning)
            base = keras.applications.MobileNetV2(
                input_shape=(size, size, 3), include_top=False, weights=weights, alpha=m.alpha, name=BASE_NAME
            )
        if weights is None and m.weights != "none":
            base.load_weights(m.weights)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a failed download or load
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        fix = (
            "with no internet, put the Keras weight files in $KERAS_HOME/models or pass "
            "--set model.weights=PATH"
            if m.weights == "imagenet"
            else "check the file is MobileNetV2 weights for this alpha"
        )
        raise ModelError(f"model.weights={m.weights!r}: cannot load ({reason}); {fix}") from None
    assert len(base.layers) == BASE_LAYERS, len(base.layers)
    return base


def build_augmentation(config: Config, seed: int | None = None) -> keras.Sequential:
    """The tutorial's augmentation; seeded so one seed gives the same views."""
    a, seed = config.augment, config.data.seed if seed is None else seed
    layers = []
    if a.flip != "none":
        layers.append(keras.layers.RandomFlip(a.flip, seed=seed))
    if a.rotation > 0:
        layers.append(keras.layers.RandomRotation(a.rotation, seed=seed + 1))
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
            n, zeros = shape[0], tf.zeros_like(angles)
            matrix = self.rotate._compute_affine_matrix(  # noqa: SLF001 - the layer's own geometry, tested
                center_x=0.5, center_y=0.5, angle=angles, translate_x=zeros, translate_y=zeros,
                scale=tf.ones_like(angles), shear_x=zeros, shear_y=zeros, height=shape[1], width=shape[2])
            x = self.rotate.transform_images(x, {"rotation_matrix": matrix, "angle": angles, "image_height": shape[1],
                                                 "image_width": shape[2], "batch_size": n})
        return x


def build_model(config: Config, num_classes: int, base: keras.Model | None = None) -> keras.Model:
    """The full classifier; `model.get_layer(BASE_NAME)` is the MobileNetV2 base: `build_base(config)`, or
    `base` (one built for this config) reused as it is, weights included."""
    if num_classes < 2:
        raise ModelError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    size = config.data.image_size
    if base is None:
        base = build_base(config)
    assert tuple(base.input_shape[1:]) == (size, size, 3), (base.input_shape, size)
    inputs = keras.Input((size, size, 3), name=INPUT_NAME)
    x = build_augmentation(config)(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale_to_unit")(x)  # MobileNetV2's [-1, 1]
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(config.model.dropout, seed=config.data.seed, name="dropout")(x)
    # Two classes: one logit and binary cross-entropy, as the seed; more: one logit per class.
    outputs = keras.layers.Dense(1 if num_classes == 2 else num_classes, name="logits")(x)
    model = keras.Model(inputs, outputs, name="mobiletune")
    set_trainable(model, phase=1, config=config)
    return model


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def producers(base: keras.Model) -> dict[int, int]:
    """id(tensor) -> index in `base.layers` of the layer that makes it, in the base's own graph: public
    `Layer.output` only, so a Keras upgrade cannot break the cut (`features.boundary_tensors`) quietly."""
    return {id(t): i for i, layer in enumerate(base.layers) for t in keras.tree.flatten(layer.output)}


def inputs_of(layer: keras.layers.Layer) -> list:
    """The tensors `layer` reads in the graph it was built in (its first call)."""
    return keras.tree.flatten(layer.input)


def set_trainable(model: keras.Model, phase: int, config: Config) -> None:
    """Phase 1: the whole base frozen. Phase 2: base layers from `fine_tune_at` on train.

    With bn_mode "inference" every BatchNormalization layer is made non-trainable, which in
    Keras 3 is what keeps it in inference mode; `base(x, training=False)` alone does not.
    """
    base = base_of(model)
    if phase == 1:
        base.trainable = False
        return
    base.trainable = True
    for layer in base.layers[: config.phase2.fine_tune_at]:
        layer.trainable = False
    if config.model.bn_mode == "inference":
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def is_binary(model: keras.Model) -> bool:
    return model.output_shape[-1] == 1


def loss_and_metric(binary: bool) -> tuple[keras.losses.Loss, keras.metrics.Metric]:
    """Loss and accuracy on logits: accuracy thresholds the logit at 0 (probability 0.5)."""
    if binary:
        return (keras.losses.BinaryCrossentropy(from_logits=True),
                keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"))
    return (keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"))


def make_optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    return {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam,
            "sgd": keras.optimizers.SGD}[name](learning_rate=lr)


def compile_fresh(model: keras.Model, optimizer: str, lr: float) -> None:
    """Compile `model` with a new `optimizer`, its loss and accuracy on logits, and the optimizer's slots."""
    loss, metric = loss_and_metric(is_binary(model))
    model.compile(optimizer=make_optimizer(optimizer, lr), loss=loss, metrics=[metric])
    # Its slots now, not lazily inside the first traced step: variables made there make tf.function
    # trace the whole training step twice (~0.6 s of a phase-2 fit and ~0.1 s of phase 1 on
    # flowers_mini, paid again by every sweep trial)
    model.optimizer.build(model.trainable_variables)


def load_model(path: str | Path) -> keras.Model:
    """Load a .keras model safely: no arbitrary code (Lambda layers are refused)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 - a damaged zip or config raises many types
        text = str(exc)
        if "Lambda" in text or "safe_mode" in text:
            raise ModelError(f"{path}: holds a Lambda layer (arbitrary code); mobiletune refuses to load it") from None
        reason = text.splitlines()[0] if text else exc.__class__.__name__
        raise ModelError(f"{path}: not a loadable .keras model ({reason[:200]})") from None


def serving_model(model: keras.Model, scoring: bool = False) -> keras.Model:
    """Pixels 0-255 -> probabilities, from the trained layers: no augmentation, no dropout.

    A binary model's single logit z becomes Dense(2) with logits [0, z], whose softmax is exactly
    [1 - sigmoid(z), sigmoid(z)]: every export has the same [n, classes] output. `scoring`: also
    the logits and pooled features, for the unknown-input score (`unknown`).
    """
    logits_layer = model.get_layer("logits")
    kernel, bias = logits_layer.get_weights()
    if kernel.shape[1] == 1:
        kernel = np.concatenate([np.zeros_like(kernel), kernel], axis=1)
        bias = np.concatenate([np.zeros_like(bias), bias])
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    x = inputs
    for name in ("scale_to_unit", BASE_NAME, "pool"):
        x = model.get_layer(name)(x)
    dense = keras.layers.Dense(kernel.shape[1], name="logits")
    logits = dense(x)
    dense.set_weights([kernel, bias])
    outputs = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model(inputs, [outputs, logits, x] if scoring else outputs, name="mobiletune_serving")
