import keras
import numpy as np
import pytest

from conftest import TINY
from mobiletune.config import load_config
from mobiletune.errors import ModelError
from mobiletune.model import convention
from mobiletune.model import network as model_lib
from mobiletune.model.network import Classifier, create_model


def _config(*extra):
    return load_config(overrides=[*TINY, *extra])


def test_structure_and_preprocessing_inside():
    classifier = create_model(_config(), num_classes=2)
    model = classifier.model
    names = [layer.name for layer in model.layers]
    assert names == ["pixels", "augment", "scale_to_unit", "mobilenetv2", "pool", "dropout", "logits"]
    assert model.output_shape == (None, 1) and classifier.binary and classifier.num_classes == 2
    assert len(classifier.base.layers) == 154 and classifier.base is model.get_layer("mobilenetv2")
    assert [layer.name for layer in classifier.augment.layers] == ["flip", "rotation"]
    x = np.array([[0.0, 127.5, 255.0, 3.0]], np.float32)
    assert np.allclose(classifier.rescale(x), [-1, 0, 1, 3 / 127.5 - 1])
    assert np.array_equal(np.asarray(classifier.rescale(x)), convention.to_unit(x))  # the frozen pass's scaling


def test_multiclass_head():
    classifier = create_model(_config(), num_classes=5)
    assert classifier.model.output_shape == (None, 5) and not classifier.binary and classifier.num_classes == 5


def test_a_saved_classifier_is_a_plain_keras_model_with_its_parts(tmp_path):
    """The .keras file loads with safe_mode=True in a process that never imports mobiletune, and wrapped again
    it has the same parts and serves the same probabilities."""
    import subprocess
    import sys

    classifier = create_model(_config(), num_classes=3)
    classifier.model.save(tmp_path / "m.keras")
    loaded = Classifier(model_lib.load_model(tmp_path / "m.keras"))
    assert [v.name for v in loaded.logits.weights] == [v.name for v in classifier.logits.weights]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.serving_model()(x), classifier.serving_model()(x), rtol=1e-5, atol=1e-6)
    code = ("import keras, sys; m = keras.models.load_model(sys.argv[1], safe_mode=True); "
            "assert 'mobiletune' not in sys.modules; print(m.output_shape)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.keras")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().endswith("(None, 3)")


def test_a_binary_model_serves_two_probabilities_from_its_one_logit():
    classifier = create_model(_config(), num_classes=2)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    probs, logits, _ = (np.asarray(t) for t in classifier.serving_model(scoring=True)(x))
    z = np.asarray(classifier.model(x, training=False))
    np.testing.assert_allclose(logits, convention.two_logits(z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-z[:, 0])), rtol=1e-5)
    assert convention.two_logits(np.array([[1.0, 2.0, 3.0]])).shape == (1, 3)  # more classes: as they are


def test_phase_trainability():
    config = _config("phase2.fine_tune_at=120")
    classifier = create_model(config, 2)
    base = classifier.base
    assert not any(layer.trainable for layer in base.layers) or not base.trainable
    assert len(classifier.model.trainable_weights) == 2  # the Dense head only
    classifier.set_trainable(2, config)
    trainable = [i for i, layer in enumerate(base.layers) if layer.trainable and layer.weights]
    assert min(trainable) >= 120
    assert not any(layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))


def _bn_drift_after_one_epoch(bn_mode: str) -> float:
    config = _config(f"model.bn_mode={bn_mode}", "phase2.fine_tune_at=0")
    classifier = create_model(config, 2)
    classifier.set_trainable(2, config)
    model = classifier.model
    loss, metric = model_lib.loss_and_metric(True)
    model.compile(optimizer=model_lib.make_optimizer("rmsprop", 1e-5), loss=loss, metrics=[metric])
    bns = [layer for layer in classifier.base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    before = [layer.moving_variance.numpy() for layer in bns]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(x, rng.integers(0, 2, 8), batch_size=4, epochs=1, verbose=0)
    return max(float(np.abs(layer.moving_variance.numpy() - b).max()) for layer, b in zip(bns, before, strict=True))


def test_batchnorm_stays_in_inference_mode_when_fine_tuning():
    """The offline weights fold BN (moving_variance = 1 - eps): training-mode BN would destroy them."""
    assert _bn_drift_after_one_epoch("inference") == 0.0
    assert _bn_drift_after_one_epoch("train") > 1e-3  # the trap this setting avoids, shown to be real


def test_imagenet_features_are_real():
    """The offline weights load and give features that tell a cat photo from noise."""
    from conftest import CATS_DOGS
    from mobiletune.data.pixels import decode_image

    base = model_lib.build_base(load_config(overrides=["data.image_size=96"]))
    cat = decode_image((CATS_DOGS / "train" / "cats" / "cat.0.jpg").read_bytes(), 96)[None].astype("float32")
    noise = np.random.default_rng(0).uniform(0, 255, cat.shape).astype("float32")
    f_cat, f_noise = (np.asarray(base(convention.to_unit(x))).mean(axis=(1, 2))[0] for x in (cat, noise))
    assert np.corrcoef(f_cat, f_noise)[0, 1] < 0.9 and f_cat.max() > 1


def test_bad_weights_file(tmp_path):
    bogus = tmp_path / "w.h5"
    bogus.write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match="model.weights="):
        model_lib.build_base(_config(f"model.weights={bogus}"))


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        model_lib.load_model(tmp_path / "missing.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ModelError, match="not a loadable .keras model"):
        model_lib.load_model(broken)


def test_lambda_layer_is_refused(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ModelError, match="Lambda"):
        model_lib.load_model(path)


def test_a_model_that_is_no_classifier_is_refused_by_name():
    inputs = keras.Input((8, 8, 3))
    other = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs), name="someone_elses")
    with pytest.raises(ModelError, match="'someone_elses': not a mobiletune classifier \\(no layer 'augment'\\)"):
        Classifier(other)
