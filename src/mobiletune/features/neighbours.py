"""Nearest neighbours among pooled features by cosine: exact blockwise search, or a faiss HNSW graph for large sets.

What the audit's duplicate and off-topic checks, the split's duplicate check and the unknown-input score all need:
each row's k most similar rows. Measured on 2 cores (benchmarks/neighbours.py, docs/scaling.md), all rows against
all, k = 11: scikit-learn's brute force 87.9 s and 2.0 GB at 50,000 rows; the exact search here, which computes
each block of the upper triangle of X X^T once, 36.5 s and 0.6 GB; faiss's HNSW graph 55 s at 50,000 but 277 s
against 487 s at 200,000, with recall@10 0.995-0.999 and every near-duplicate pair (cosine >= 0.90) found.
"""

from __future__ import annotations

import numpy as np

from mobiletune.model.convention import unit_rows

__all__ = ["EXACT_UP_TO", "nearest", "search"]

# Rows searched exactly; above, an HNSW graph: the exact search grows with N^2, the graph's with ~N log N, and
# the two measured 36.5 against 55 s at 50,000 rows and 487 against 277 s at 200,000
EXACT_UP_TO = 100_000
# Similarities a query block holds against the reference: 16 MB of float32 (and 32 MB of argpartition's indices).
# 2,048 queries against 20,000 reference rows held 1.3 GB at once, the peak of a 200,000-image run
SEARCH_ENTRIES = 2**22
BLOCK = 2048  # rows a side of each block of X X^T: 16 MB of float32, large enough for BLAS to run at full speed
# The graph as measured (faiss's M, efConstruction, efSearch): recall@10 0.993-0.999 against exact search from
# 10,000 to 200,000 rows, and every near-copy pair (cosine >= 0.90) of 500 planted at 50,000
HNSW_LINKS, HNSW_BUILD_DEPTH, HNSW_SEARCH_DEPTH = 32, 40, 64
CHUNK = 16_384  # rows scaled, added and searched at a time above EXACT_UP_TO: 80 MB of float32
# The graph's copy of the rows: "sq8", 1,280 bytes a row (8 bits a feature over the range that feature spans in
# SQ_SAMPLE rows spread over the set), or "fp16", 2,560. At 200,000 rows sq8 holds 256 MB less, the margin a
# 200,000-image run needed under 2.5 GB; at 50,000 realistic rows it kept every near-copy pair (500 of 500, as
# fp16 did) at recall@10 0.9926 against 0.9984 (benchmarks/neighbours.py, docs/scaling.md)
GRAPH_ROWS = "sq8"
SQ_SAMPLE = 16_384


def nearest(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar rows by cosine, the row itself included, most similar first: (similarities
    [n, k], indices [n, k]); k is capped at n. A row is similar to itself (1); an all-zero row to nothing else (0).
    `features`: [n, d], an array or rows read as used (`store.StoredRows`), which the graph reads CHUNK at a time."""
    k = min(k, len(features))
    if k == 0:
        return np.zeros((len(features), 0), np.float32), np.zeros((len(features), 0), np.int64)
    if len(features) > EXACT_UP_TO:
        return _graph(features, k)
    rows = unit_rows(features)
    best, ids = np.empty((len(rows), k), np.float32), np.empty((len(rows), k), np.int64)
    step = max(BLOCK, k)  # so the first column block holds k columns
    for a in range(0, len(rows), step):
        for b in range(a, len(rows), step):
            block = rows[a:a + step] @ rows[b:b + step].T
            if b == a:
                np.fill_diagonal(block, 1.0)  # an all-zero row too: itself, as scikit-learn's cosine metric has it
            _fold(best, ids, block, a, b)
            if b > a:  # the block's transpose: rows b.. against columns a..
                _fold(best, ids, block.T, b, a)
    return _sorted(best, ids)


def search(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most similar `reference` rows by cosine, most similar first: (similarities, indices); k is
    capped at the reference's length. Exact, a block of queries at a time."""
    queries, reference = unit_rows(queries), unit_rows(reference)
    k = min(k, len(reference))
    best, ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    step = max(1, SEARCH_ENTRIES // max(1, len(reference)))
    for a in range(0, len(queries), step):
        block = queries[a:a + step] @ reference.T
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        best[a:a + step], ids[a:a + step] = np.take_along_axis(block, top, 1), top
    return _sorted(best, ids)


def _fold(best: np.ndarray, ids: np.ndarray, block: np.ndarray, row0: int, col0: int) -> None:
    """Fold `block` (rows row0.., columns col0..) into its rows' running top k (`best`, `ids`). A row meets the
    first column block first (`nearest`'s order), and takes its top k whole; after that only the entries that
    beat a row's k-th are sorted in with its current k, which soon are few."""
    k, rows = best.shape[1], slice(row0, row0 + len(block))
    if col0 == 0:
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        best[rows], ids[rows] = np.take_along_axis(block, top, 1), top + col0
        return
    r, c = np.nonzero(block > best[rows].min(axis=1, keepdims=True))
    if not len(r):
        return
    touched = np.unique(r)
    owner = np.concatenate([np.repeat(touched, k), r])
    value = np.concatenate([best[row0 + touched].ravel(), block[r, c]])
    ident = np.concatenate([ids[row0 + touched].ravel(), c + col0])
    order = np.lexsort((-value, owner))  # by row, each row's most similar first
    owner, value, ident = owner[order], value[order], ident[order]
    starts = np.searchsorted(owner, touched)
    rank = np.arange(len(owner)) - np.repeat(starts, np.diff(np.append(starts, len(owner))))
    keep = rank < k
    best[row0 + touched], ids[row0 + touched] = value[keep].reshape(-1, k), ident[keep].reshape(-1, k)


def _sorted(best: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -best), axis=1)  # ties by index, so the result does not depend on the blocks
    return np.take_along_axis(best, order, 1), np.take_along_axis(ids, order, 1)


def _graph(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate `nearest` by a faiss HNSW graph on inner products (cosine: rows scaled to unit length), the rows
    kept as GRAPH_ROWS says (float16 rows: recall@10 0.9934 on 30,000 realistic rows against 0.9935 as float32, and
    faster). Rows go in and are searched CHUNK at a time: the graph's copy (1,280 bytes a row as sq8 and ~256 of
    links) is the only one of the whole set it makes."""
    import faiss

    kind = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}[GRAPH_ROWS]
    graph = faiss.IndexHNSWSQ(features.shape[1], kind, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = HNSW_BUILD_DEPTH
    if not graph.is_trained:  # each feature's range, from rows spread over the whole set
        sample = np.random.default_rng(0).choice(len(features), min(len(features), SQ_SAMPLE), replace=False)
        graph.train(unit_rows(features[np.sort(sample)]))
    for a in range(0, len(features), CHUNK):
        graph.add(unit_rows(features[a:a + CHUNK]))
    graph.hnsw.efSearch = max(HNSW_SEARCH_DEPTH, k)
    best, ids = np.empty((len(features), k), np.float32), np.empty((len(features), k), np.int64)
    for a in range(0, len(features), CHUNK):
        best[a:a + CHUNK], ids[a:a + CHUNK] = graph.search(unit_rows(features[a:a + CHUNK]), k)
    return _sorted(best, ids)
