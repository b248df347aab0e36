import keras
import numpy as np
import pytest

from conftest import TINY
from mobiletune import model as model_lib
from mobiletune.config import load_config
from mobiletune.errors import ModelError


def _config(*extra):
    return load_config(overrides=[*TINY, *extra])


def test_structure_and_preprocessing_inside():
    model = model_lib.build_model(_config(), num_classes=2)
    names = [layer.name for layer in model.layers]
    assert names == ["pixels", "augment", "scale_to_unit", "mobilenetv2", "pool", "dropout", "logits"]
    assert model.output_shape == (None, 1)
    assert len(model_lib.base_of(model).layers) == 154
    scale = model.get_layer("scale_to_unit")
    assert np.allclose(scale(np.array([0.0, 127.5, 255.0])), [-1, 0, 1])


def test_multiclass_head():
    assert model_lib.build_model(_config(), num_classes=5).output_shape == (None, 5)


def test_phase_trainability():
    config = _config("phase2.fine_tune_at=120")
    model = model_lib.build_model(config, 2)
    base = model_lib.base_of(model)
    assert not any(layer.trainable for layer in base.layers) or not base.trainable
    assert len(model.trainable_weights) == 2  # the Dense head only
    model_lib.set_trainable(model, phase=2, config=config)
    trainable = [i for i, layer in enumerate(base.layers) if layer.trainable and layer.weights]
    assert min(trainable) >= 120
    assert not any(layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))


def _bn_drift_after_one_epoch(bn_mode: str) -> float:
    config = _config(f"model.bn_mode={bn_mode}", "phase2.fine_tune_at=0")
    model = model_lib.build_model(config, 2)
    model_lib.set_trainable(model, phase=2, config=config)
    loss, metric = model_lib.loss_and_metric(True)
    model.compile(optimizer=model_lib.make_optimizer("rmsprop", 1e-5), loss=loss, metrics=[metric])
    bns = [layer for layer in model_lib.base_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]
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
    from mobiletune.pixels import decode_image

    base = model_lib.build_base(load_config(overrides=["data.image_size=96"]))
    cat = decode_image((CATS_DOGS / "train" / "cats" / "cat.0.jpg").read_bytes(), 96)[None].astype("float32")
    noise = np.random.default_rng(0).uniform(0, 255, cat.shape).astype("float32")
    f_cat, f_noise = (np.asarray(base(x / 127.5 - 1)).mean(axis=(1, 2))[0] for x in (cat, noise))
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
