import keras
import numpy as np
import pytest

from conftest import TINY
from mobiletune.config import load_config
from mobiletune.data import folders as data
from mobiletune.features import cache, dataset, store
from mobiletune.features import compute as features
from mobiletune.features import onnx as onnx_lib
from mobiletune.model import convention, cut
from mobiletune.model import network as model_lib
from mobiletune.model.cut import extractor
from mobiletune.model.network import create_model


@pytest.fixture(scope="module")
def built():
    config = load_config(overrides=[*TINY, "data.image_size=64"])
    return config, create_model(config, 2)


def test_boundary_follows_residual_skips(built):
    _, model = built
    base = model.base
    made_by = model_lib.producers(base)
    name = lambda t: base.layers[made_by[id(t)]].name  # noqa: E731
    names = sorted(name(t) for t in cut.boundary_tensors(base, 100))
    assert names == ["block_10_project_BN", "block_11_expand_BN"]  # the cut falls inside block 11
    assert cut.boundary_tensors(base, 0) == base.inputs
    assert [name(t) for t in cut.boundary_tensors(base, 153)] == ["Conv_1_bn"]


@pytest.mark.parametrize("fine_tune_at", [0, 1, 57, 100, 153])
def test_top_on_cached_boundary_equals_the_full_model(built, fine_tune_at):
    """Cutting the network changes nothing: the top, fed the boundary, gives the model's own logits."""
    _, model = built
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    extract, where = extractor(model, [fine_tune_at, 120])
    outputs = extract(convention.to_unit(x))
    pooled, boundary = outputs[0], [outputs[i] for i in where[fine_tune_at]]
    full = np.asarray(model.model(x, training=False))
    top = np.asarray(cut.top_model(model, fine_tune_at)(boundary if len(boundary) > 1 else boundary[0]))
    head = np.asarray(model.head(pooled))
    assert np.allclose(top, full, atol=1e-4) and np.allclose(head, full, atol=1e-4)


def _toy_store(tmp_path, values: np.ndarray) -> tuple[store.FeatureStore, list[bytes]]:
    """A real store holding `values` [rows, ...] as items "0", "1", ..., written by `fill`."""
    st = store.FeatureStore(tmp_path / "toy", [(values.shape[1:], str(values.dtype))])
    keys = [store.item_key(str(i), "plain") for i in range(len(values))]

    def compute(chunk, folder, heartbeat):
        rows = [keys.index(k) for k in chunk]
        np.save(folder / "0.npy", values[rows])
        return set()

    st.fill(keys, compute)
    return st, keys


def test_batches_shuffle_and_draw_views_per_epoch(tmp_path):
    st, keys = _toy_store(tmp_path, np.arange(3 * 10, dtype=np.float16).reshape(30, 1))  # row = view * 10 + image
    reader = st.reader(keys)
    labels = np.arange(10)

    def epochs(initial_epoch, end):
        ds = dataset.feature_dataset(reader, [0], labels, 3, 4, shuffle=True, seed=0, initial_epoch=initial_epoch,
                                      epochs=end)
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
    plain = dataset.feature_dataset(reader, [0], labels, 1, 4, shuffle=False, seed=0)
    assert np.array_equal(np.concatenate([np.asarray(x)[:, 0] for x, _ in plain]), np.arange(10))


def test_streamed_batches_equal_in_memory_batches(tmp_path):
    """Two inputs (a boundary inside a residual block), mixed dtypes, rows spread over several shards in
    an order unlike the reading order: each batch equals the same rows gathered from arrays in memory."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(18, 3, 3, 4)).astype(np.float16), rng.normal(size=(18, 5)).astype(np.float32)
    st = store.FeatureStore(tmp_path / "two", [((3, 3, 4), "float16"), ((5,), "float32")])
    keys = [store.item_key(str(i), "v") for i in range(18)]

    def compute(chunk, folder, heartbeat):
        rows = [keys.index(k) for k in chunk]
        np.save(folder / "0.npy", a[rows])
        np.save(folder / "1.npy", b[rows])
        return set()

    for part in (keys[9:], keys[:4], keys[4:9]):
        st.fill(part, compute)
    assert len(st.shards) == 3
    labels = rng.integers(0, 3, 9)
    ds = dataset.feature_dataset(st.reader(keys), [0, 1], labels, 2, 4, shuffle=True, seed=1, epochs=2)
    seen = 0
    for (xa, xb), y in ds:
        rows = [int(np.flatnonzero(b[:, 0] == r[0])[0]) for r in np.asarray(xb)]  # which row each one is
        assert np.array_equal(np.asarray(xa), a[rows].astype(np.float32)) and xa.dtype == "float32"
        assert np.array_equal(np.asarray(y), labels[np.array(rows) % 9])
        seen += len(y)
    assert seen == 18


def _items(images, config, augmenting=True) -> set[bytes]:
    needed = features._needed(images, config, augmenting)
    return {store.item_key(images.hashes[i], features.view_tag(config, v)) for s in needed for i, v in needed[s]}


def test_cache_hits_and_reuse(built, cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2"])
    _, model = built
    images = data.load_images(cats_dogs_tiny, config.data)
    first = features.compute_features(model, images, config, tmp_path)
    second = features.compute_features(model, images, config, tmp_path)
    assert (first.computed, first.cached) == (12 * 2 + 8 + 2, 0)
    assert (second.computed, second.cached) == (0, 34)
    pooled, *boundary = first.readers["train"].read(np.arange(24), [0, *first.boundaries[100]])
    assert pooled.shape == (24, 1280) and [x.shape[1:] for x in boundary] == [(4, 4, 576), (4, 4, 96)]
    assert boundary[0].dtype == np.float16
    again = second.readers["train"].read(np.arange(24), [0])[0]
    assert np.array_equal(pooled, again)
    assert not np.array_equal(pooled[:12], pooled[12:])  # two views differ
    assert first.cache_bytes() > 0
    other = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2", "phase2.fine_tune_at=120"])
    assert features.compute_features(model, images, other, tmp_path).computed == 34  # new boundary, new store
    stores, used = cache.list_cache(tmp_path)
    assert sorted(s.items for s in stores) == [34, 34] and len(used) == 2
    assert used[0]["images"] == 22 and str(cats_dogs_tiny.resolve()) == used[0]["data_dir"]
    assert len(cache.list_extractors(tmp_path)) == 2  # one exported extractor per boundary set
    removed, megabytes = cache.clear_cache(tmp_path, older_than=3600)
    assert removed == 0 and len(cache.list_cache(tmp_path)[0]) == 2  # all used just now: kept
    removed, megabytes = cache.clear_cache(tmp_path)
    assert removed >= 6 and megabytes > 0 and cache.list_cache(tmp_path) == ([], [])
    assert cache.list_extractors(tmp_path) == []


def test_new_images_subsets_and_resplits_compute_only_what_is_missing(built, flowers_tiny, tmp_path):
    from conftest import FLOWERS, copy_images

    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2"])
    _, model = built
    first = features.compute_features(model, data.load_images(flowers_tiny, config.data), config, tmp_path)
    assert first.cached == 0
    copy_images(FLOWERS, flowers_tiny, 1, offset=5)  # one new image per class
    grown = data.load_images(flowers_tiny, config.data)
    new = {h for h in grown.hashes} - set(first.images.hashes)
    assert len(new) == 5
    again = features.compute_features(model, grown, config, tmp_path)
    assert again.computed == len(_items(grown, config) - _items(first.images, config))
    assert again.computed <= 5 * 2 + 2  # the new images' views, and at most a held-out image that moved
    resplit_config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2",
                                            "data.holdout_fraction=0.25"])
    resplit = data.load_images(flowers_tiny, resplit_config.data)
    known = _items(grown, config) | _items(first.images, config)
    third = features.compute_features(model, resplit, resplit_config, tmp_path)
    assert third.computed == len(_items(resplit, resplit_config) - known)  # only images that changed role
    for f in sorted((flowers_tiny / "roses").iterdir())[3:]:
        f.unlink()
    subset = data.load_images(flowers_tiny, config.data)
    assert features.compute_features(model, subset, config, tmp_path).computed == 0


def test_views_depend_on_the_image_not_its_position(built, cats_dogs_tiny, tmp_path):
    """The same image keeps its augmented features whatever else is in the folder."""
    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2"])
    _, model = built
    full = features.compute_features(model, data.load_images(cats_dogs_tiny, config.data), config, tmp_path / "a")
    for f in sorted((cats_dogs_tiny / "train" / "cats").iterdir())[:3]:
        f.unlink()
    part = features.compute_features(model, data.load_images(cats_dogs_tiny, config.data), config, tmp_path / "b")
    h = part.images.hashes[part.images.indices("train")[0]]
    i_full, i_part = full.images.hashes.index(h), 0
    n_full, n_part = len(full.images.indices("train")), len(part.images.indices("train"))
    j_full = int(np.flatnonzero(full.images.indices("train") == i_full)[0])
    for view in range(2):
        x = full.readers["train"].read(np.array([view * n_full + j_full]), [0])[0]
        y = part.readers["train"].read(np.array([view * n_part + i_part]), [0])[0]
        assert np.allclose(x, y, atol=1e-5)


def _onnx_outputs(path, x):
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path)).graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ([i.name for i in graph.input], [o.name for o in graph.output])
    return names, session.run(None, {session.get_inputs()[0].name: x})


def test_onnx_export_is_the_file_keras_writes(built, tmp_path, monkeypatch):
    """The quick export (tf2onnx without Keras' resource tracking or the optimizer's copies) gives Keras'
    own file: same inputs and outputs by name, same numbers to the bit."""
    _, model = built
    extract, _ = extractor(model, [100, 140])
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    extract(x)
    with monkeypatch.context() as patched:  # the quick path itself, not the fallback to Keras' export
        patched.setattr(keras.Model, "export", lambda *a, **k: pytest.fail("fell back to Keras' export"))
        onnx_lib.export_onnx(extract, tmp_path / "ours.onnx")
    extract.export(str(tmp_path / "keras.onnx"), format="onnx", verbose=False)
    (names, ours), (keras_names, theirs) = _onnx_outputs(tmp_path / "ours.onnx", x), _onnx_outputs(
        tmp_path / "keras.onnx", x)
    assert names == keras_names and len(ours) == len(extract.outputs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_onnx_export_falls_back_to_keras_own(built, tmp_path, monkeypatch):
    _, model = built
    extract, _ = extractor(model, [140])
    x = np.zeros((1, 64, 64, 3), "float32")
    extract(x)

    def fails(*args):
        raise RuntimeError("a tf2onnx pass failed")

    import tf2onnx.optimizer

    careful = tf2onnx.optimizer.optimize_graph
    monkeypatch.setattr(onnx_lib, "_tf2onnx_export", fails)
    onnx_lib.export_onnx(extract, tmp_path / "m.onnx")
    assert len(_onnx_outputs(tmp_path / "m.onnx", x)[1]) == len(extract.outputs)
    assert tf2onnx.optimizer.optimize_graph is careful  # tf2onnx as it was


def test_truncated_shards_and_extractors_are_made_again(built, cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "data.image_size=64"])
    _, model = built
    images = data.load_images(cats_dogs_tiny, config.data)
    first = features.compute_features(model, images, config, tmp_path)
    expected = first.readers["test"].read(np.arange(2), [0, 1])
    (onnx,) = (tmp_path / "onnx").glob("*.onnx")
    onnx.write_bytes(b"not onnx")
    (shard,) = (tmp_path / "features").glob("*/shards/[!.]*")
    with open(shard / "1.npy", "r+b") as f:  # as a crash mid-write would leave it
        f.truncate(f.seek(0, 2) // 2)
    again = features.compute_features(model, images, config, tmp_path)
    assert again.computed == 34 and onnx.stat().st_size > 1000
    got = again.readers["test"].read(np.arange(2), [0, 1])
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(expected, got, strict=True))


def test_one_pass_serves_several_boundaries(built, cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=1"])
    _, model = built
    images = data.load_images(cats_dogs_tiny, config.data)
    many = features.compute_features(model, images, config, tmp_path, fine_tune_ats=[100, 140, 120])
    single = features.compute_features(model, images, config, tmp_path / "single")
    assert set(many.boundaries) == {100, 120, 140} and many.computed == 12 + 8 + 2
    a = many.readers["validation"].read(np.arange(8), many.boundaries[100])
    b = single.readers["validation"].read(np.arange(8), single.boundaries[100])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_file_changed_after_the_scan_is_skipped_never_stale(built, cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "data.image_size=64"])
    _, model = built
    images = data.load_images(cats_dogs_tiny, config.data)
    victim = images.root / images.paths[0]
    old_hash = images.hashes[0]
    victim.write_bytes((cats_dogs_tiny / images.paths[1]).read_bytes()[:-10] + b"new tail!!")
    feats = features.compute_features(model, images, config, tmp_path)
    assert images.paths[0] not in feats.images.paths and old_hash not in feats.images.hashes
    assert any("changed since it was scanned" in s.reason for s in feats.images.skipped)
    rescanned = data.load_images(cats_dogs_tiny, config.data)  # the next run uses the new content
    assert images.paths[0] in rescanned.paths and old_hash not in rescanned.hashes


def test_a_full_disk_while_caching_is_one_clear_error(built, cats_dogs_tiny, tmp_path, monkeypatch):
    import errno

    from mobiletune.errors import MobiletuneError

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features._Computer, "__call__", no_space)
    config = load_config(overrides=[*TINY, "data.image_size=64"])
    images = data.load_images(cats_dogs_tiny, config.data)
    with pytest.raises(MobiletuneError, match="cannot write the feature cache .No space left on device.; free space"):
        features.compute_features(built[1], images, config, tmp_path)
    assert cache.list_cache(tmp_path)[0][0].items == 0 and not list((tmp_path / "features").glob("*/shards/.*"))


def test_two_training_processes_share_one_cache(cats_dogs_tiny, tmp_path):
    """Two `mobiletune train` processes started together on one folder and one cache: both finish, the
    cache holds every item once, and between them they computed each item once."""
    import json
    import os
    import subprocess
    import sys

    sets = [f"--set={s}" for s in [*TINY, "data.image_size=64", f"features.cache_dir={tmp_path / 'cache'}"]]
    procs = [subprocess.Popen([sys.executable, "-m", "mobiletune", "train", str(cats_dogs_tiny), "--out",
                               str(tmp_path / f"run{i}"), "--quiet", *sets], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    counts = [json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["features"] for i in range(2)]
    # 12 training images x (2 views + the plain one the audit compares) + 8 validation + 2 test = 46 items
    assert sum(c["images_computed"] for c in counts) == 46 and all(c["images_cached"] + c["images_computed"] == 46
                                                                   for c in counts)
    stores, _ = cache.list_cache(tmp_path / "cache")
    assert [s.items for s in stores] == [46]
