"""The nearest-neighbour search (features.neighbours) against scikit-learn's brute-force cosine search, on rows with
planted copies, blank rows and ties; blocks made tiny so every merge path runs (pure: no model)."""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from mobiletune.features import neighbours


def _rows(n: int, seed: int) -> np.ndarray:
    """Clustered rows like pooled features (non-negative, a few groups), one copy planted per 50 rows."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(max(2, n // 40), 24)))
    rows = np.abs(centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.6, size=(n, 24)))
    for i in range(0, n - 1, 50):
        rows[i + 1] = rows[i] * 1.02 + 0.01
    return rows.astype(np.float32)


def _expected(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    distances, ids = NearestNeighbors(n_neighbors=k, metric="cosine").fit(reference).kneighbors(queries)
    return 1.0 - distances, ids


@pytest.mark.parametrize(("n", "block", "k"), [(1, 4, 11), (7, 3, 11), (37, 8, 5), (300, 16, 11), (1000, 128, 11)])
def test_the_blockwise_search_finds_what_brute_force_finds(monkeypatch, n, block, k):
    monkeypatch.setattr(neighbours, "BLOCK", block)
    rows = _rows(n, n)
    similarities, ids = neighbours.nearest(rows, k)
    expected_sims, expected_ids = _expected(rows, rows, min(k, n))
    assert similarities.shape == ids.shape == (n, min(k, n))
    assert np.allclose(similarities, expected_sims, atol=1e-5)
    assert (np.diff(similarities, axis=1) <= 1e-6).all()  # most similar first
    assert (ids[:, 0] == np.arange(n)).all()  # itself first
    assert all(set(a) == set(b) for a, b in zip(ids, expected_ids, strict=True))
    for i in range(0, n - 1, 50):  # each planted copy is its original's nearest other row, and back
        assert ids[i, 1] == i + 1 and ids[i + 1, 1] == i


def test_the_blocks_do_not_change_the_answer(monkeypatch):
    rows = _rows(500, 1)
    rows[100:110] = rows[99]  # eleven identical rows: each one's 11 nearest are the eleven, whatever the blocks
    answers = []
    for block in (7, 64, 2048):
        monkeypatch.setattr(neighbours, "BLOCK", block)
        answers.append(neighbours.nearest(rows, 11))
    for similarities, ids in answers[1:]:
        assert np.allclose(similarities, answers[0][0], atol=1e-6)  # which of several tied rows is kept may vary
        assert all(set(ids[i]) == set(range(99, 110)) for i in range(99, 110))
    assert all(set(answers[0][1][i]) == set(range(99, 110)) for i in range(99, 110))


def test_queries_find_their_nearest_reference_rows(monkeypatch):
    monkeypatch.setattr(neighbours, "BLOCK", 16)
    reference, queries = _rows(200, 2), _rows(70, 3)
    for k in (1, 5, 200, 500):
        similarities, ids = neighbours.search(queries, reference, k)
        expected_sims, expected_ids = _expected(queries, reference, min(k, 200))
        assert np.allclose(similarities, expected_sims, atol=1e-5)
        assert all(set(a) == set(b) for a, b in zip(ids, expected_ids, strict=True))


def test_large_sets_go_to_the_graph_and_keep_their_copies(monkeypatch):
    """Above EXACT_UP_TO rows the search is faiss's HNSW graph: nearly every neighbour exact search finds, and
    every planted copy; rows go in and are searched in chunks."""
    rows = _rows(3000, 4)
    exact = neighbours.nearest(rows, 11)
    monkeypatch.setattr(neighbours, "EXACT_UP_TO", 1000)
    monkeypatch.setattr(neighbours, "CHUNK", 700)
    similarities, ids = neighbours.nearest(rows, 11)
    recall = np.mean([len(set(a[1:]) & set(b[1:])) / 10 for a, b in zip(ids, exact[1], strict=True)])
    assert recall > 0.97
    assert (np.diff(similarities, axis=1) <= 1e-6).all()
    for i in range(0, 2999, 50):
        assert i + 1 in ids[i] and i in ids[i + 1]


def test_empty_and_zero_k():
    assert neighbours.nearest(np.zeros((0, 8), np.float32), 11)[0].shape == (0, 0)
    assert neighbours.nearest(np.ones((4, 8), np.float32), 0)[1].shape == (4, 0)
