"""The network: raw pixels -> augmentation -> [-1, 1] -> MobileNetV2 -> pooled -> logits.

Preprocessing lives inside the model, so training, predict and every export see the same
input: RGB pixels 0-255 at the trained size. The augmentation layers are inactive at inference.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras

from mobiletune.config import BASE_LAYERS, Config
from mobiletune.errors import ModelError
from mobiletune.model import convention
from mobiletune.model.augment import build_augmentation
from mobiletune.quiet import drop_retracing_warnings

drop_retracing_warnings()  # every module that runs a model imports this one



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
                input_shape=(size, size, 3), include_top=False, weights=weights, alpha=m.alpha, name=Classifier.BASE
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


class Classifier:
    """The classifier as named parts, as keras-hub's `ImageClassifier`: pixels 0-255 -> `augment` ->
    `rescale` ([-1, 1]) -> `base` (MobileNetV2) -> `pool` -> `dropout` -> `logits`.

    `model` is the plain functional Keras model that trains and is saved (a `.keras` file that loads with
    `safe_mode=True` and needs no mobiletune); this object names its layers, here and nowhere else, and
    knows its conventions (`convention`): the [-1, 1] input scale and one logit for two classes.
    """

    INPUT, AUGMENT, RESCALE, BASE, POOL, DROPOUT, LOGITS = (
        "pixels", "augment", "scale_to_unit", "mobilenetv2", "pool", "dropout", "logits")
    PARTS = (AUGMENT, RESCALE, BASE, POOL, DROPOUT, LOGITS)

    def __init__(self, model: keras.Model):
        missing = [n for n in self.PARTS if n not in {layer.name for layer in model.layers}]
        if missing:
            raise ModelError(f"model {model.name!r}: not a mobiletune classifier (no layer {missing[0]!r}); give a "
                             "run folder or a model.keras that `mobiletune train` made")
        self.model = model
        self.augment: keras.Sequential = model.get_layer(self.AUGMENT)
        self.rescale: keras.layers.Rescaling = model.get_layer(self.RESCALE)
        self.base: keras.Model = model.get_layer(self.BASE)
        self.pool: keras.layers.GlobalAveragePooling2D = model.get_layer(self.POOL)
        self.dropout: keras.layers.Dropout = model.get_layer(self.DROPOUT)
        self.logits: keras.layers.Dense = model.get_layer(self.LOGITS)

    @property
    def binary(self) -> bool:
        """Two classes, one logit (binary cross-entropy, as the seed)."""
        return self.logits.units == 1

    @property
    def num_classes(self) -> int:
        return 2 if self.binary else self.logits.units

    @property
    def pool_width(self) -> int:
        """Channels of the pooled base output."""
        return int(self.base.output.shape[-1])

    @property
    def augmenting(self) -> bool:
        return bool(self.augment.layers)

    def head(self, x):
        """Pooled features -> logits through the classifier's own dropout and dense layer."""
        return self.logits(self.dropout(x))

    def freeze_base(self) -> None:
        """Phase 1: the whole base frozen; only the new head trains."""
        self.base.trainable = False

    def unfreeze_from(self, fine_tune_at: int, bn_mode: str = "inference") -> None:
        """Phase 2: base layers from `fine_tune_at` on train. With bn_mode "inference" every BatchNormalization
        layer is made non-trainable, which in Keras 3 is what keeps it in inference mode; `base(x,
        training=False)` alone does not."""
        self.base.trainable = True
        for layer in self.base.layers[:fine_tune_at]:
            layer.trainable = False
        if bn_mode == "inference":
            for layer in self.base.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False

    def set_trainable(self, phase: int, config: Config) -> None:
        """The trainable flags of `phase` (1: `freeze_base`, 2: `unfreeze_from`) under `config`."""
        if phase == 1:
            self.freeze_base()
        else:
            self.unfreeze_from(config.phase2.fine_tune_at, config.model.bn_mode)

    def pooled_layers(self, x: keras.KerasTensor, layers: tuple[str, ...] = ()) -> list[keras.KerasTensor]:
        """Rescaled pixels -> the pooled output of each base layer named in `layers`, then the pooled base output
        (the tensor the head reads, last): the parts of the unknown-input score's features."""
        if not layers:  # the base called whole: one nested model in the serving graph, as exports expect
            return [self.pool(self.base(x))]
        base = self.base
        return self.pooled_maps(keras.Model(base.input, [*(base.get_layer(v).output for v in layers), base.output])(x))

    def pooled_maps(self, maps: list[keras.KerasTensor]) -> list[keras.KerasTensor]:
        """The middle layers' maps and the base output's (last) -> their global averages, the base output's through
        the classifier's own pool: what `pooled_layers` gives from pixels, and `cut.top_model` from the cache."""
        *middle, last = maps
        return [*(keras.layers.GlobalAveragePooling2D()(m) for m in middle), self.pool(last)]

    def scoring_model(self, layers: tuple[str, ...] = ()) -> keras.Model:
        """Pixels 0-255 -> [the unknown-input score's features (`pooled_layers` side by side), logits as the
        training model has them (one for two classes)], unaugmented and without dropout: what the detector is
        fitted on. `serving_model` gives the same features beside probabilities for predict and exports."""
        inputs = keras.Input(self.model.input_shape[1:], name=self.INPUT)
        parts = self.pooled_layers(self.rescale(inputs), layers)
        return keras.Model(inputs, [side_by_side(parts), self.logits(parts[-1])], name="mobiletune_scoring")

    def serving_model(self, scoring: bool = False, layers: tuple[str, ...] = (), apart: bool = False) -> keras.Model:
        """Pixels 0-255 -> probabilities [n, classes], from the trained layers: no augmentation, no dropout. A
        binary model's logit layer becomes Dense(2) with logits (0, z) (`convention.two_logits`), so every
        export has the same output. `scoring`: also the logits and the unknown-input score's features
        (`pooled_layers` of `layers`): side by side, or with `apart` one output each (an int8 export then gives
        each its own scale).
        """
        kernel, bias = (convention.two_logits(w) for w in self.logits.get_weights())
        inputs = keras.Input(self.model.input_shape[1:], name=self.INPUT)
        parts = self.pooled_layers(self.rescale(inputs), layers)
        dense = keras.layers.Dense(kernel.shape[1], name=self.LOGITS)
        logits = dense(parts[-1])
        dense.set_weights([kernel, bias])
        outputs = keras.layers.Softmax(name="probabilities")(logits)
        if not scoring:
            return keras.Model(inputs, outputs, name="mobiletune_serving")
        features = parts if apart else [side_by_side(parts)]
        return keras.Model(inputs, [outputs, logits, *features], name="mobiletune_serving")


def side_by_side(parts: list[keras.KerasTensor]) -> keras.KerasTensor:
    """Pooled outputs [n, channels] side by side (one part: itself)."""
    return parts[0] if len(parts) == 1 else keras.layers.Concatenate(axis=-1)(parts)


def create_model(config: Config, num_classes: int, base: keras.Model | None = None) -> Classifier:
    """The one factory of classifiers (timm's `create_model`): MobileNetV2 `build_base(config)`, or `base` (one
    built for this config, reused as it is, weights included), with a new head, phase 1's trainable flags set."""
    if num_classes < 2:
        raise ModelError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    size, names = config.data.image_size, Classifier
    if base is None:
        base = build_base(config)
    assert tuple(base.input_shape[1:]) == (size, size, 3), (base.input_shape, size)
    inputs = keras.Input((size, size, 3), name=names.INPUT)
    x = build_augmentation(config)(inputs)
    x = keras.layers.Rescaling(1 / convention.PIXEL_SCALE, offset=-1, name=names.RESCALE)(x)
    x = keras.layers.GlobalAveragePooling2D(name=names.POOL)(base(x))
    x = keras.layers.Dropout(config.model.dropout, seed=config.data.seed, name=names.DROPOUT)(x)
    # Two classes: one logit and binary cross-entropy, as the seed; more: one logit per class.
    outputs = keras.layers.Dense(1 if num_classes == 2 else num_classes, name=names.LOGITS)(x)
    classifier = Classifier(keras.Model(inputs, outputs, name="mobiletune"))
    classifier.set_trainable(phase=1, config=config)
    return classifier


def producers(base: keras.Model) -> dict[int, int]:
    """id(tensor) -> index in `base.layers` of the layer that makes it, in the base's own graph: public
    `Layer.output` only, so a Keras upgrade cannot break the cut (`cut.boundary_tensors`) quietly."""
    return {id(t): i for i, layer in enumerate(base.layers) for t in keras.tree.flatten(layer.output)}


def inputs_of(layer: keras.layers.Layer) -> list:
    """The tensors `layer` reads in the graph it was built in (its first call)."""
    return keras.tree.flatten(layer.input)


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
    loss, metric = loss_and_metric(model.output_shape[-1] == 1)
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
