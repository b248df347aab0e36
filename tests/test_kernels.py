import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from mobiletune import features, kernels
from mobiletune import model as model_lib
from mobiletune.config import load_config


def _phase2_model(bn_mode: str = "inference", fine_tune_at: int = 100):
    config = load_config(overrides=[*TINY, "data.image_size=64", f"model.bn_mode={bn_mode}",
                                    f"phase2.fine_tune_at={fine_tune_at}"])
    model = model_lib.build_model(config, 3)
    model_lib.set_trainable(model, phase=2, config=config)
    return model


def _cut(model, fine_tune_at: int, images: int = 4):
    x = np.random.default_rng(0).uniform(0, 255, (images, 64, 64, 3)).astype("float32")
    extract, where = features.extractor(model, [fine_tune_at])
    outputs = extract(x / 127.5 - 1)
    cut = [outputs[i] for i in where[fine_tune_at]]
    return cut if len(cut) > 1 else cut[0]  # the top takes a lone tensor, as Keras wants


def _loss_and_grads(trainee, cut):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(trainee(cut, training=False) ** 2)
    return loss, tape.gradient(loss, trainee.trainable_variables)


@pytest.mark.parametrize("fine_tune_at", [100, 57])
def test_fast_trainee_computes_the_same_layers_with_the_same_variables(fine_tune_at):
    """Folded BatchNorm and 1x1 convolutions as matrix products: the same outputs and gradients (to float
    rounding), on the classifier's own variables, in the same order (optimizer state lines up)."""
    model = _phase2_model(fine_tune_at=fine_tune_at)
    fast, plain = (features.top_model(model, fine_tune_at, fast=f) for f in (True, False))
    assert [id(v) for v in fast.trainable_variables] == [id(v) for v in plain.trainable_variables]
    folded = [layer for layer in fast.get_layer("upper_base").layers if isinstance(layer, kernels.FoldedConv)]
    assert folded and all(layer.bn is not None for layer in folded)  # every conv above the cut takes its BN in
    cut = _cut(model, fine_tune_at)
    (loss_fast, grads_fast), (loss_plain, grads_plain) = _loss_and_grads(fast, cut), _loss_and_grads(plain, cut)
    assert np.isclose(float(loss_fast), float(loss_plain), rtol=1e-4)
    for a, b in zip(grads_fast, grads_plain, strict=True):
        assert np.allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()))


def test_training_the_fast_trainee_trains_the_classifier():
    model = _phase2_model()
    trainee = features.top_model(model, 100)
    kernel = model_lib.base_of(model).get_layer("block_16_project").kernel
    before = kernel.numpy().copy()
    trainee.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainee.train_on_batch(_cut(model, 100), np.ones((4, 3), "float32"))
    assert not np.allclose(kernel.numpy(), before)


def test_a_batchnorm_that_trains_is_not_folded():
    """bn_mode=train: BatchNorm normalises by batch statistics, which no kernel can absorb."""
    model = _phase2_model(bn_mode="train")
    layers = features.top_model(model, 100).get_layer("upper_base").layers
    folded = [layer for layer in layers if isinstance(layer, kernels.FoldedConv)]
    assert folded and all(layer.bn is None for layer in folded)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_compute_the_batch_with_the_same_variables(replicas):
    """Slices of the batch side by side: the whole batch's outputs and gradients, on the same
    variables in the same order, also when the batch does not divide evenly (5 images)."""
    model = _phase2_model()
    whole, sliced = features.top_model(model, 100), features.top_model(model, 100, replicas=replicas)
    assert [id(v) for v in sliced.trainable_variables] == [id(v) for v in whole.trainable_variables]
    cut = _cut(model, 100, images=5)
    assert np.allclose(sliced(cut, training=False), whole(cut, training=False), atol=1e-5)
    (loss_sliced, grads_sliced), (loss_whole, grads_whole) = _loss_and_grads(sliced, cut), _loss_and_grads(whole, cut)
    assert np.isclose(float(loss_sliced), float(loss_whole), rtol=1e-5)
    for a, b in zip(grads_sliced, grads_whole, strict=True):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


THREADS = """
import sys, tensorflow as tf
from mobiletune import kernels
if sys.argv[1] == "started":
    tf.constant(1.0) + 1  # TensorFlow's runtime starts: its thread pools are fixed from here on
first = kernels.replica_threads(2)
tf.constant(1.0) + 1
print(first, kernels.replica_threads(2), kernels.replica_threads(1),
      tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="replicas need 2 cores")
@pytest.mark.parametrize("when", ["fresh", "started"])
def test_replica_threads_are_set_before_tensorflow_starts_or_not_at_all(when):
    """Process-wide: a fresh process gets one op per core's share (and keeps it), a process whose
    TensorFlow already runs keeps its pools and trains the batch whole."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", THREADS, when], capture_output=True, text=True, env=env, check=True)
    cores = os.cpu_count()
    expected = f"2 2 1 {cores // 2} 2" if when == "fresh" else "1 1 1 0 0"
    assert out.stdout.split() == expected.split()
