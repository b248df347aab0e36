import numpy as np
import pytest

from conftest import TINY
from mobiletune import data, features
from mobiletune import model as model_lib
from mobiletune.config import load_config


@pytest.fixture(scope="module")
def built():
    config = load_config(overrides=[*TINY, "data.image_size=64"])
    return config, model_lib.build_model(config, 2)


def test_boundary_follows_residual_skips(built):
    _, model = built
    base = model_lib.base_of(model)
    names = sorted(t._keras_history.operation.name for t in features.boundary_tensors(base, 100))
    assert names == ["block_10_project_BN", "block_11_expand_BN"]  # the cut falls inside block 11
    assert features.boundary_tensors(base, 0) == base.inputs
    assert [t._keras_history.operation.name for t in features.boundary_tensors(base, 153)] == ["Conv_1_bn"]


@pytest.mark.parametrize("fine_tune_at", [0, 1, 57, 100, 153])
def test_top_on_cached_boundary_equals_the_full_model(built, fine_tune_at):
    """Cutting the network changes nothing: the top, fed the boundary, gives the model's own logits."""
    _, model = built
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    extract, where = features.extractor(model, [fine_tune_at, 120])
    outputs = extract(x / 127.5 - 1)
    pooled, cut = outputs[0], [outputs[i] for i in where[fine_tune_at]]
    full = np.asarray(model(x, training=False))
    top = np.asarray(features.top_model(model, fine_tune_at)(cut if len(cut) > 1 else cut[0]))
    head = np.asarray(features.head_model(model)(pooled))
    assert np.allclose(top, full, atol=1e-4) and np.allclose(head, full, atol=1e-4)


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed-from-memmap"])
def test_batches_shuffle_and_draw_views_per_epoch(tmp_path, in_memory):
    np.save(tmp_path / "0.npy", np.arange(3 * 10, dtype=np.float16).reshape(3, 10, 1))  # value = view * 10 + image
    arrays = [np.load(tmp_path / "0.npy", mmap_mode="r")]  # as the cache hands them out
    labels = np.arange(10)

    def epochs(initial_epoch, end):
        ds = features.feature_dataset(arrays, labels, 4, shuffle=True, seed=0, initial_epoch=initial_epoch,
                                      epochs=end, in_memory=in_memory)
        batches = [(np.asarray(x)[:, 0], np.asarray(y)) for x, y in ds]
        assert [len(y) for _, y in batches] == [4, 4, 2] * (end - initial_epoch)
        out = []
        for e in range(end - initial_epoch):
            x, y = (np.concatenate(p) for p in zip(*batches[3 * e : 3 * e + 3], strict=True))
            assert sorted(y) == list(range(10))  # every image exactly once per epoch
            assert np.array_equal(x % 10, y)  # each row its own image, in some view
            out.append(x)
        return out

    first, second, third = epochs(0, 3)
    assert not np.array_equal(first, second)
    assert len({int(v) for e in (first, second, third) for v in e // 10}) > 1  # views are drawn
    assert np.array_equal(epochs(2, 3)[0], third)  # a resumed run reads epoch 2 exactly as before
    plain = features.feature_dataset(arrays, labels, 4, shuffle=False, seed=0, in_memory=in_memory)
    assert np.array_equal(np.concatenate([np.asarray(x)[:, 0] for x, _ in plain]), np.arange(10))


def test_streamed_batches_equal_in_memory_batches(tmp_path):
    """Two inputs (a boundary inside a residual block), mixed dtypes: the same batches either way."""
    rng = np.random.default_rng(0)
    for i, (shape, dtype) in enumerate((((2, 9, 3, 3, 4), np.float16), ((2, 9, 5), np.float32))):
        np.save(tmp_path / f"{i}.npy", rng.normal(size=shape).astype(dtype))
    arrays = [np.load(tmp_path / f"{i}.npy", mmap_mode="r") for i in range(2)]
    labels = rng.integers(0, 3, 9)
    read = [list(features.feature_dataset(arrays, labels, 4, shuffle=True, seed=1, epochs=2, in_memory=m))
            for m in (True, False)]
    assert len(read[0]) == len(read[1]) == 6
    for (xa, ya), (xb, yb) in zip(*read, strict=True):
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(xa, xb, strict=True))
        assert np.array_equal(ya, yb)


def test_fits_in_memory_asks_the_kernel():
    assert features.fits_in_memory([np.zeros(10)])
    assert not features.fits_in_memory([np.zeros(10)], share=0.0)


def test_cache_hits_and_reuse(built, cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2"])
    _, model = built
    images = data.load_images(cats_dogs_tiny, config.data)
    first = features.compute_features(model, images, config, tmp_path)
    second = features.compute_features(model, images, config, tmp_path)
    assert (first.misses, second.hits, second.misses) == (3, 3, 0)
    assert first.pooled("train")[0].shape == (2, 12, 1280) and first.pooled("test")[0].shape == (1, 2, 1280)
    assert [a.shape[2:] for a in first.boundary("train", 100)] == [(4, 4, 576), (4, 4, 96)]
    assert first.boundary("train", 100)[0].dtype == np.float16
    for a, b in zip(first.splits["train"], second.splits["train"], strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first.pooled("train")[0][0], first.pooled("train")[0][1])  # two views differ
    other = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2", "phase2.fine_tune_at=120"])
    assert features.compute_features(model, images, other, tmp_path).misses == 3  # new boundary, new key
    assert len(features.list_cache(tmp_path)) == 6
    assert len(features.list_extractors(tmp_path)) == 2  # one exported extractor per boundary set
    assert features.clear_cache(tmp_path) == (6, 2) and features.list_cache(tmp_path) == []
    assert features.list_extractors(tmp_path) == []


def test_damaged_cache_files_are_made_again(built, cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "data.image_size=64"])
    _, model = built
    images = data.load_images(cats_dogs_tiny, config.data)
    first = features.compute_features(model, images, config, tmp_path)
    expected = [np.array(a) for a in first.splits["test"]]
    (onnx,) = (tmp_path / "onnx").glob("*.onnx")
    onnx.write_bytes(b"not onnx")
    for entry in (tmp_path / "features").iterdir():
        (entry / "0.npy").write_bytes(b"\x93NUMPY truncated")
    assert len(features.list_cache(tmp_path)) == 0  # damaged entries are not listed
    again = features.compute_features(model, images, config, tmp_path)
    assert again.misses == 3 and onnx.stat().st_size > 1000
    assert all(np.array_equal(a, b) for a, b in zip(expected, again.splits["test"], strict=True))


def test_one_pass_serves_several_boundaries(built, cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=1"])
    _, model = built
    images = data.load_images(cats_dogs_tiny, config.data)
    many = features.compute_features(model, images, config, tmp_path, fine_tune_ats=[100, 140, 120])
    single = features.compute_features(model, images, config, tmp_path / "single")
    assert set(many.boundaries) == {100, 120, 140} and many.misses == 3
    for a, b in zip(many.boundary("validation", 100), single.boundary("validation", 100), strict=True):
        assert np.array_equal(a, b)


def test_a_full_disk_while_caching_is_one_clear_error(built, cats_dogs_tiny, tmp_path, monkeypatch):
    import errno

    from mobiletune.errors import MobiletuneError

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features, "_extract_views", no_space)
    config = load_config(overrides=[*TINY, "data.image_size=64"])
    images = data.load_images(cats_dogs_tiny, config.data)
    with pytest.raises(MobiletuneError, match="cannot write the feature cache .No space left on device.; free space"):
        features.compute_features(built[1], images, config, tmp_path)
    assert features.list_cache(tmp_path) == [] and not list((tmp_path / "features").glob(".tmp-*"))
