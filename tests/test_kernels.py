import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from mobiletune.config import load_config
from mobiletune.model import convention, cut, kernels
from mobiletune.model.cut import extractor
from mobiletune.model.network import create_model


def _phase2_model(bn_mode: str = "inference", fine_tune_at: int = 100):
    config = load_config(overrides=[*TINY, "data.image_size=64", f"model.bn_mode={bn_mode}",
                                    f"phase2.fine_tune_at={fine_tune_at}"])
    classifier = create_model(config, 3)
    classifier.set_trainable(2, config)
    return classifier


def _cut(model, fine_tune_at: int):
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    extract, where = extractor(model, [fine_tune_at])
    outputs = extract(convention.to_unit(x))
    boundary = [outputs[i] for i in where[fine_tune_at]]
    return boundary if len(boundary) > 1 else boundary[0]  # the top takes a lone tensor, as Keras wants


def _loss_and_grads(trainee, cut):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(trainee(cut, training=False) ** 2)
    return loss, tape.gradient(loss, trainee.trainable_variables)


@pytest.mark.parametrize("fine_tune_at", [100, 57])
def test_fast_trainee_computes_the_same_layers_with_the_same_variables(fine_tune_at):
    """Folded BatchNorm and 1x1 convolutions as matrix products: the same outputs and gradients (to float
    rounding), on the classifier's own variables, in the same order (optimizer state lines up)."""
    model = _phase2_model(fine_tune_at=fine_tune_at)
    fast, plain = (cut.top_model(model, fine_tune_at, fast=f) for f in (True, False))
    assert [id(v) for v in fast.trainable_variables] == [id(v) for v in plain.trainable_variables]
    folded = [layer for layer in fast.get_layer("upper_base").layers if isinstance(layer, kernels.FoldedConv)]
    assert folded and all(layer.bn is not None for layer in folded)  # every conv above the cut takes its BN in
    boundary = _cut(model, fine_tune_at)
    (loss_fast, grads_fast), (loss_plain, grads_plain) = (_loss_and_grads(fast, boundary),
                                                          _loss_and_grads(plain, boundary))
    assert np.isclose(float(loss_fast), float(loss_plain), rtol=1e-4)
    for a, b in zip(grads_fast, grads_plain, strict=True):
        assert np.allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()))


def test_training_the_fast_trainee_trains_the_classifier():
    model = _phase2_model()
    trainee = cut.top_model(model, 100)
    kernel = model.base.get_layer("block_16_project").kernel
    before = kernel.numpy().copy()
    trainee.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainee.train_on_batch(_cut(model, 100), np.ones((4, 3), "float32"))
    assert not np.allclose(kernel.numpy(), before)


def test_a_batchnorm_that_trains_is_not_folded():
    """bn_mode=train: BatchNorm normalises by batch statistics, which no kernel can absorb."""
    model = _phase2_model(bn_mode="train")
    layers = cut.top_model(model, 100).get_layer("upper_base").layers
    folded = [layer for layer in layers if isinstance(layer, kernels.FoldedConv)]
    assert folded and all(layer.bn is None for layer in folded)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)
