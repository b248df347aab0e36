"""The per-image feature store: shards, claims, damage, and two processes filling one store."""

import multiprocessing
import time

import numpy as np

from mobiletune.features import store


def _fill(folder, n, log, shard_bytes, start):
    """One worker: fill items 0..n-1 (value = item number), slowly, logging what it computed."""
    store.SHARD_BYTES = shard_bytes
    st = store.FeatureStore(folder, [((2,), "float32")])
    start.wait(timeout=60)  # both begin together, however long each took to start
    keys = [store.item_key(str(i), "plain") for i in range(n)]

    def compute(chunk, out, heartbeat):
        rows = [keys.index(k) for k in chunk]
        time.sleep(0.1)
        np.save(out / "0.npy", np.repeat(np.array(rows, np.float32)[:, None], 2, axis=1))
        with open(log, "a") as f:
            f.write("".join(f"{r}\n" for r in rows))
        return set()

    computed, failed = st.fill(keys, compute)
    assert not failed
    values = st.reader(keys).read(np.arange(n), [0])[0]
    assert np.array_equal(values[:, 0], np.arange(n))  # every item readable, and the right one
    return computed


def test_two_processes_fill_one_store_without_computing_twice(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold TensorFlow threads
    n, row = 60, 8  # 8 bytes per item; 40-byte shards: 5 items each, 12 shards to share out
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        start = manager.Barrier(2)
        results = [pool.apply_async(_fill, (tmp_path / "s", n, tmp_path / f"log{w}", 5 * row, start))
                   for w in range(2)]
        computed = [r.get(timeout=120) for r in results]
    logged = [int(x) for w in range(2) if (tmp_path / f"log{w}").exists()
              for x in (tmp_path / f"log{w}").read_text().split()]
    assert sum(computed) == n and sorted(logged) == list(range(n))  # each item computed exactly once
    assert min(computed) > 0  # and the work was shared
    st = store.FeatureStore(tmp_path / "s", [((2,), "float32")])
    assert len(st) == n and sum(s.rows for s in st.shards) == n
    assert not list((tmp_path / "s" / "claims").glob("*.json"))


def test_failed_items_are_left_out_and_reported(tmp_path):
    st = store.FeatureStore(tmp_path / "s", [((1,), "float32")])
    keys = [store.item_key(str(i), "plain") for i in range(5)]

    def compute(chunk, out, heartbeat):
        np.save(out / "0.npy", np.arange(len(chunk), dtype=np.float32)[:, None])
        return {keys[3]}

    computed, failed = st.fill(keys, compute)
    assert (computed, failed) == (4, {keys[3]}) and st.missing(keys) == [keys[3]]
    assert st.reader([keys[4]]).read(np.array([0]), [0])[0][0, 0] == 4  # rows kept in place


def test_a_stale_claim_of_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    st = store.FeatureStore(tmp_path / "s", [((1,), "float32")])
    keys = [store.item_key("a", "plain")]
    claim = tmp_path / "s" / "claims" / "00000000000000000001-999999-dead.json"
    claim.write_text(f'["{keys[0].decode()}"]')
    old = time.time() - store.CLAIM_STALE_SECONDS - 1
    import os

    os.utime(claim, (old, old))

    def compute(chunk, out, heartbeat):
        np.save(out / "0.npy", np.ones((len(chunk), 1), np.float32))
        return set()

    assert st.fill(keys, compute) == (1, set()) and not claim.exists()


def test_a_truncated_shard_is_detected_and_dropped(tmp_path):
    st = store.FeatureStore(tmp_path / "s", [((4,), "float32")])
    keys = [store.item_key(str(i), "plain") for i in range(3)]

    def compute(chunk, out, heartbeat):
        np.save(out / "0.npy", np.ones((len(chunk), 4), np.float32))
        return set()

    st.fill(keys, compute)
    (shard,) = (tmp_path / "s" / "shards").glob("[!.]*")
    with open(shard / "0.npy", "r+b") as f:
        f.truncate(100)
    again = store.FeatureStore(tmp_path / "s", [((4,), "float32")])
    assert again.damaged == 1 and again.missing(keys) == keys and not shard.exists()


def test_stored_rows_read_what_they_are_asked_for_and_a_search_over_them_matches(tmp_path, monkeypatch):
    """`StoredRows` (a run's pooled features, read as used): slices and np.asarray give the stored rows as float32,
    in the reader's order (shards of 7 rows: reads cross them), and the neighbour search over them, exact or by
    the graph in chunks, finds what it finds over the array."""
    from mobiletune.features import neighbours

    monkeypatch.setattr(store, "SHARD_BYTES", 7 * 16 * 2)
    values = np.abs(np.random.default_rng(0).normal(size=(60, 16))).astype(np.float16)
    st = store.FeatureStore(tmp_path / "s", [((16,), "float16")])
    keys = [store.item_key(str(i), "plain") for i in range(60)]

    def compute(chunk, out, heartbeat):
        np.save(out / "0.npy", values[[keys.index(k) for k in chunk]])
        return set()

    st.fill(keys, compute)
    order = np.random.default_rng(1).permutation(60)
    rows = store.StoredRows(st.reader([keys[i] for i in order]), 0)
    expected = values[order].astype(np.float32)
    assert len(rows) == 60 and rows.shape == (60, 16)
    assert rows[5:19].dtype == np.float32 and np.array_equal(rows[5:19], expected[5:19])
    assert np.array_equal(np.asarray(rows), expected) and np.array_equal(np.asarray(rows, np.float64), expected)
    exact = neighbours.nearest(expected, 6)
    assert all(np.array_equal(a, b) for a, b in zip(neighbours.nearest(rows, 6), exact, strict=True))
    monkeypatch.setattr(neighbours, "EXACT_UP_TO", 10)
    monkeypatch.setattr(neighbours, "CHUNK", 11)
    graph = neighbours.nearest(rows, 6)
    assert np.mean([len(set(a) & set(b)) / 6 for a, b in zip(graph[1], exact[1], strict=True)]) > 0.95
