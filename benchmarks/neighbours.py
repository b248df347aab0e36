"""Nearest neighbours for `mobiletune audit`: scikit-learn's brute force (today) against faiss, hnswlib and usearch.

    .venv/bin/python benchmarks/neighbours.py [--sizes 10000 50000 200000] [--features FILE.npy|FILE.npz]
        [--only faiss usearch ...] [--full-exact] [--full-grid] [--twice-up-to 10000] [--wheels] [--json OUT.json]

What `audit.checks.nearest` computes: for N images' 1280-d pooled features, each image's 11 nearest images by cosine
(itself included). Per N, every candidate runs in a fresh process (`--worker`) on 2 threads (OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and the library's own setting): it loads the rows, L2-normalises them in chunks of 16,384 and
adds them to its index (build s), then asks for every row's 11 nearest (query s), once per search setting (a
build is shared by its search settings, and so are its peak RSS and index bytes). Peak RSS is the worker's VmHWM
(rows included: N x 5,120 bytes; ru_maxrss would carry over the parent's peak from the fork), taken before the
index is serialized to size it. Index bytes per image: the library's own account (faiss serialize_index, hnswlib
index_file_size, usearch serialized_length; numpy: its normalised copy; scikit-learn keeps the input rows, no index)
and the growth of resident memory over the build. Sizes up to --twice-up-to run twice: times are medians of the
two, "same twice" says whether both gave identical neighbours and similarities; larger sizes run once. "CPU s" is
the worker's CPU time over build and query (less moved than wall time by other work on the machine); "x sklearn"
is today's search time over the candidate's, wall (and CPU), measured in the same run.

Scores, against exact search and ignoring the image itself: recall@10; recall of the near-duplicate pairs (cosine
>= 0.90 among the 10 neighbours, a pair found from either side, by the library's own similarity; "+n": pairs it
reports that exact search does not); of the keypoint candidate pairs (each image and its 2 nearest others from
cosine 0.60, found among the library's 2 nearest); the mean absolute error of the 5th-nearest-other similarity (the
off-topic score); and the planted copies found (near copies by the 0.90 rule, looser ones among the keypoint pairs).

Exact truth is numpy: each 2048 x 2048 block of the upper triangle of X X^T once, each row's top 11 kept (itself a
timed candidate, with no new dependency). Where scikit-learn or faiss's flat index searches every row, the script
says how far they are from it. Above 50,000 rows scikit-learn and faiss's flat index (both exact) search only the
first 5,000 rows, their query time scaled by N / 5,000 and marked "est.", their scores taken on those rows (planted
copies: "-", as a pair is often found from its other row), unless --full-exact. faiss-cpu's wheels bring their own
OpenBLAS (0.3.15), which takes a CPU it does not know (here a model-207 Xeon) for a Prescott and multiplies on
SSE3: the flat index runs as shipped (every row only up to 10,000) and again with OPENBLAS_CORETYPE=Haswell, as
does IVF (its k-means). Above 50,000, without --full-grid, only the settings that did best up to 50,000 run (faiss
HNSW efC 40 built on 1 thread, hnswlib M 32, usearch f16 at expansion_search 64 and 128), for the run's time.
numpy's exact result is kept in /tmp/ann/work for --reuse-exact.

Rows are made from real pooled MobileNetV2 features in /tmp/exp/sets (full-cats_and_dogs_filtered.npz, 3,000
photos, 2 classes, and full-flowers_mini.npz, 200 photos, 5 classes; or --features: one array [n, 1280], one
class, or an .npz with `pooled` and `labels`), seeded by (seed, N): each row is a convex mix (Dirichlet weights) of
2 or 3 photos of one class, every feature scaled by lognormal noise (sigma 0.35) and 15% of them zeroed (a third
of real pooled features are 0). Then 1% of the rows are replaced by near copies of other rows (each feature scaled
by lognormal noise whose sigma is bisected to land at a cosine drawn from 0.90-0.98 to the original) and 1% by
looser copies (0.65-0.85), so both the near-duplicate rule and the keypoint candidates have planted truth.

Candidates not installed are skipped. They are looked for on sys.path, which gets /tmp/ann/lib first (install one
there with `.venv/bin/pip install --target /tmp/ann/lib --no-deps faiss-cpu`), so the script runs unchanged once
one is a dependency in the venv. --wheels also lists which candidates ship wheels for Python 3.10-3.13 on Linux
x86-64, macOS arm64 and Windows (`pip download --only-binary=:all:` into /tmp/ann/wheels; needs the index).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LIB = Path("/tmp/ann/lib")
sys.path.insert(0, str(LIB))
SETS = Path("/tmp/exp/sets")
REAL = ("full-cats_and_dogs_filtered.npz", "full-flowers_mini.npz")
WORK = Path("/tmp/ann/work")
WHEELS = Path("/tmp/ann/wheels")
THREADS = 2
K = 11  # checks.NEIGHBOURS + 1: the image itself included
NEAR, CHECKED, CHECKED_COSINE, OFFTOPIC_K = 0.90, 2, 0.60, 5  # as in audit.checks and audit.scores
CHUNK = 16384  # rows normalised, added and searched at a time
BLOCK = 2048  # numpy exact search: square blocks of X X^T
SIGMA, DROP = 0.35, 0.15  # per-feature lognormal noise and share of features zeroed, in every generated row
EXACT_FULL_UP_TO, EXACT_SUBSET = 50000, 5000
GRID_UP_TO = 50000  # above it, without --full-grid, only the settings that did best up to it (the run's time)
MODULES = {"numpy": "numpy", "sklearn": "sklearn", "faiss": "faiss", "hnswlib": "hnswlib", "usearch": "usearch"}
WHEEL_PACKAGES = ("scikit-learn", "faiss-cpu", "hnswlib", "usearch")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORMS = {"Linux x86-64": ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64"),
             "macOS arm64": ("macosx_14_0_arm64",), "Windows amd64": ("win_amd64",)}


# --- rows --------------------------------------------------------------------------------------------------------


def load_real(features: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Real pooled features and their class labels; exits 2 when there are none."""
    if features is not None:
        data = np.load(features)
        if isinstance(data, np.ndarray):
            return data.astype(np.float32), np.zeros(len(data), np.int64)
        return data["pooled"].astype(np.float32), data["labels"].astype(np.int64)
    if not all((SETS / name).exists() for name in REAL):
        print(f"no features: {SETS}/{{{','.join(REAL)}}} missing (pass --features FILE.npy)", file=sys.stderr)
        sys.exit(2)
    pooled, labels = [], []
    for name in REAL:
        data = np.load(SETS / name)
        pooled.append(data["pooled"].astype(np.float32))
        labels.append(data["labels"].astype(np.int64) + sum(len(np.unique(lab)) for lab in labels))
    return np.concatenate(pooled), np.concatenate(labels)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def copies(base: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copies of `base` rows, each feature scaled by exp(s * g), s bisected per row to reach cosine `target`."""
    g = rng.standard_normal(base.shape, dtype=np.float32)
    lo, hi = np.zeros(len(base), np.float32), np.full(len(base), 4.0, np.float32)
    for _ in range(30):
        mid = (lo + hi) / 2
        above = cosine(base, base * np.exp(mid[:, None] * g)) > target
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    made = base * np.exp(hi[:, None] * g)
    return made, cosine(base, made)


def make_rows(real: np.ndarray, labels: np.ndarray, n: int, seed: int, path: Path) -> dict:
    """Write n generated rows to `path` (.npy, float32, not normalised); returns the planted copies."""
    rng = np.random.default_rng([seed, n])
    classes = labels[rng.integers(0, len(labels), n)]  # a class per row, as often as it has photos
    picks = np.empty((n, 3), np.int64)
    for c in np.unique(labels):
        members, mine = np.flatnonzero(labels == c), np.flatnonzero(classes == c)
        picks[mine] = members[rng.integers(0, len(members), (len(mine), 3))]
    weights = rng.dirichlet(np.ones(3), n).astype(np.float32)
    weights[rng.random(n) < 0.5, 2] = 0  # half the rows mix 2 photos, half 3
    weights /= weights.sum(1, keepdims=True)
    out = np.lib.format.open_memmap(path, "w+", np.float32, (n, real.shape[1]))
    for s in range(0, n, CHUNK // 2):
        e = min(n, s + CHUNK // 2)
        z = np.einsum("nk,nkd->nd", weights[s:e], real[picks[s:e]])
        z *= np.exp(SIGMA * rng.standard_normal(z.shape, dtype=np.float32) - SIGMA**2 / 2)
        out[s:e] = z * (rng.random(z.shape, dtype=np.float32) >= DROP)
    k = max(1, n // 100)
    order = rng.permutation(n)
    planted = {}
    for j, (name, low, high) in enumerate((("near", 0.90, 0.98), ("loose", 0.65, 0.85))):
        rows, bases = np.sort(order[j * k:(j + 1) * k]), order[(2 + j) * k:(3 + j) * k]
        out[rows], achieved = copies(np.asarray(out[bases]), rng.uniform(low, high, k).astype(np.float32), rng)
        planted[name] = {"rows": rows, "bases": bases, "cosine": achieved}
    out.flush()
    return planted


# --- the worker: one candidate in its own process ----------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised (a zero row stays zero, as scikit-learn's cosine leaves it), float32, contiguous."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1), dtype=np.float32)


def chunked(search, rows: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """search(unit rows) -> (similarities, indices) over the first q rows, CHUNK at a time."""
    parts = [search(unit(rows[s:min(q, s + CHUNK)])) for s in range(0, q, CHUNK)]
    return (np.concatenate([p[0] for p in parts]).astype(np.float32),
            np.concatenate([p[1] for p in parts]).astype(np.int64))


def exact_top(x: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest inner products with all rows, most similar first: every block of the upper triangle
    of x x^T computed once and merged into both its rows' and its columns' running top k."""
    n = len(x)
    sims, idx = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
    for a in range(0, n, BLOCK):
        for b in range(a, n, BLOCK):
            s = x[a:a + BLOCK] @ x[b:b + BLOCK].T
            merge(sims, idx, a, s, b)
            if b > a:
                merge(sims, idx, b, s, a, flip=True)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def merge(sims: np.ndarray, idx: np.ndarray, row0: int, s: np.ndarray, col0: int, flip: bool = False) -> None:
    """Fold block `s` (rows row0.. and columns col0.., or the other way round when `flip`) into the running top k
    of its rows. A block's rows all see the same column blocks in turn: the first is taken whole (argpartition),
    later ones only where an entry beats a row's k-th, sorted in with the row's current k."""
    k, count = sims.shape[1], s.shape[1] if flip else s.shape[0]
    top = slice(row0, row0 + count)
    if np.isneginf(sims[row0, -1]):
        block = np.ascontiguousarray(s.T) if flip else s
        ids = np.broadcast_to(np.arange(col0, col0 + block.shape[1]), block.shape)
        best = np.argpartition(-block, k - 1, axis=1)[:, :k]
        sims[top], idx[top] = np.take_along_axis(block, best, 1), np.take_along_axis(ids, best, 1)
        return
    kth = sims[top].min(1)
    a, b = np.divmod(np.flatnonzero(s > (kth[None, :] if flip else kth[:, None])), s.shape[1])  # s's own order
    if not len(a):
        return
    r, c = (b, a) if flip else (a, b)
    rows = np.unique(r)
    owner = np.concatenate([np.repeat(rows, k), r])
    value = np.concatenate([sims[row0 + rows].ravel(), s[a, b]])
    ident = np.concatenate([idx[row0 + rows].ravel(), c + col0])
    order = np.lexsort((-value, owner))
    owner, value, ident = owner[order], value[order], ident[order]
    first = np.searchsorted(owner, rows)
    keep = np.arange(len(owner)) - np.repeat(first, np.diff(np.append(first, len(owner)))) < k
    sims[row0 + rows], idx[row0 + rows] = value[keep].reshape(-1, k), ident[keep].reshape(-1, k)


def build_numpy(params: dict, rows: np.ndarray):
    x = np.empty_like(rows)
    for s in range(0, len(rows), CHUNK):
        x[s:s + CHUNK] = unit(rows[s:s + CHUNK])
    return (lambda setting, q: exact_top(x)), (lambda: x.nbytes)


def build_sklearn(params: dict, rows: np.ndarray):
    """Today's `nearest`: NearestNeighbors(metric="cosine") fitted on the raw rows, BLAS held to THREADS."""
    from sklearn.neighbors import NearestNeighbors
    from threadpoolctl import threadpool_limits

    threadpool_limits(THREADS)
    nn = NearestNeighbors(n_neighbors=K, metric="cosine").fit(rows)

    def search(setting: dict, q: int):
        distances, indices = nn.kneighbors(rows[:q])
        return (1 - distances).astype(np.float32), indices.astype(np.int64)

    return search, (lambda: 0 if np.shares_memory(nn._fit_X, rows) else nn._fit_X.nbytes)


def build_faiss(params: dict, rows: np.ndarray):
    """IndexFlatIP, IndexHNSWFlat or IndexIVFFlat (inner product on normalised rows = cosine)."""
    import faiss

    faiss.omp_set_num_threads(params.get("build_threads", THREADS))
    d, kind, keep = rows.shape[1], params["kind"], []
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efc"]
    else:
        keep.append(faiss.IndexFlatIP(d))
        index = faiss.IndexIVFFlat(keep[0], d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(rows), min(len(rows), 40 * params["nlist"]), replace=False)
        index.train(unit(rows[np.sort(sample)]))
    for s in range(0, len(rows), CHUNK):
        index.add(unit(rows[s:s + CHUNK]))
    faiss.omp_set_num_threads(THREADS)

    def search(setting: dict, q: int):
        if "ef" in setting:
            index.hnsw.efSearch = setting["ef"]
        if "nprobe" in setting:
            index.nprobe = setting["nprobe"]
        return chunked(lambda x: index.search(x, K), rows, q)

    return search, (lambda: faiss.serialize_index(index).nbytes)


def build_hnswlib(params: dict, rows: np.ndarray):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=rows.shape[1])
    index.init_index(max_elements=len(rows), ef_construction=params["efc"], M=params["M"], random_seed=100)
    index.set_num_threads(THREADS)
    for s in range(0, len(rows), CHUNK):
        chunk = unit(rows[s:s + CHUNK])
        index.add_items(chunk, np.arange(s, s + len(chunk)), num_threads=params.get("build_threads", THREADS))

    def search(setting: dict, q: int):
        index.set_ef(setting["ef"])

        def one(x):
            labels, distances = index.knn_query(x, k=K, num_threads=THREADS)
            return 1 - distances, labels.astype(np.int64)

        return chunked(one, rows, q)

    return search, index.index_file_size


def build_usearch(params: dict, rows: np.ndarray):
    from usearch.index import Index

    index = Index(ndim=rows.shape[1], metric="ip", dtype=params["dtype"])
    for s in range(0, len(rows), CHUNK):
        chunk = unit(rows[s:s + CHUNK])
        index.add(np.arange(s, s + len(chunk), dtype=np.uint64), chunk, threads=params.get("build_threads", THREADS))

    def search(setting: dict, q: int):
        index.expansion_search = setting["ef"]

        def one(x):
            found = index.search(x, K, threads=THREADS)
            ids = found.keys.astype(np.int64)
            ids[np.arange(K)[None, :] >= found.counts[:, None]] = -1
            return 1 - found.distances, ids

        return chunked(one, rows, q)

    return search, (lambda: index.serialized_length)


PRELOAD = {"numpy": [], "sklearn": ["sklearn.neighbors", "threadpoolctl"], "faiss": ["faiss"], "hnswlib": ["hnswlib"],
           "usearch": ["usearch.index"]}
BUILDERS = {"numpy": build_numpy, "sklearn": build_sklearn, "faiss": build_faiss, "hnswlib": build_hnswlib,
            "usearch": build_usearch}


def memory(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, in bytes. VmHWM starts afresh at exec, where ru_maxrss
    carries over the parent's peak at fork on Linux."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(spec: dict) -> None:
    """Build one candidate's index and run its searches; writes OUT-j.npz per search and OUT.json."""
    for module in PRELOAD[spec["lib"]]:  # imports stay out of the build's time and memory
        importlib.import_module(module)
    rows = np.load(spec["rows"])
    before, started, cpu = memory(), time.perf_counter(), cpu_seconds()
    search, size = BUILDERS[spec["lib"]](spec["build"], rows)
    result = {"build_s": time.perf_counter() - started, "build_cpu_s": cpu_seconds() - cpu,
              "rss_delta": memory() - before, "query_s": [], "query_cpu_s": []}
    for j, setting in enumerate(spec["search"]):
        t, cpu = time.perf_counter(), cpu_seconds()
        sims, idx = search(setting, spec["queries"])
        result["query_s"].append(time.perf_counter() - t)
        result["query_cpu_s"].append(cpu_seconds() - cpu)
        np.savez(f"{spec['out']}-{j}.npz", sims=sims, idx=idx)
    result["peak_rss"] = memory("VmHWM")  # before serializing the index to size it
    result["lib_bytes"] = int(size())
    Path(spec["out"] + ".json").write_text(json.dumps(result))


# --- the parent: candidates, scores, tables ----------------------------------------------------------------------


def candidates(n: int, full_exact: bool, full_grid: bool) -> list[dict]:
    """Every candidate at size n: (lib, label, build parameters, search settings, rows searched, the largest n it
    runs at without --full-grid, extra environment)."""
    exact_q = n if full_exact or n <= EXACT_FULL_UP_TO else EXACT_SUBSET
    slow_q = n if full_exact or n <= 10000 else EXACT_SUBSET  # faiss flat on its own OpenBLAS, see the docstring
    nlist, small = round(4 * n**0.5), None if full_grid else GRID_UP_TO
    ef, ef3 = [{"ef": 64}, {"ef": 128}], [{"ef": 64}, {"ef": 128}, {"ef": 256}]
    hnsw, haswell = {"kind": "hnsw", "M": 32, "efc": 40}, {"OPENBLAS_CORETYPE": "Haswell"}
    specs = [("numpy", "numpy exact (upper-triangle blocks)", {}, [{}], n, None, {}),
             ("sklearn", "scikit-learn brute cosine (today)", {}, [{}], exact_q, None, {}),
             ("faiss", "faiss IndexFlatIP (exact)", {"kind": "flat"}, [{}], slow_q, None, {}),
             ("faiss", "faiss IndexFlatIP (exact), OPENBLAS_CORETYPE=Haswell", {"kind": "flat"}, [{}], exact_q, None,
              haswell),
             ("faiss", "faiss HNSWFlat M=32 efC=40", hnsw, ef, n, small, {}),
             ("faiss", "faiss HNSWFlat M=32 efC=40, 1 build thread", {**hnsw, "build_threads": 1}, ef, n, None, {}),
             ("faiss", "faiss HNSWFlat M=32 efC=80", {**hnsw, "efc": 80}, ef, n, small, {}),
             ("faiss", f"faiss IVFFlat nlist={nlist}, OPENBLAS_CORETYPE=Haswell", {"kind": "ivf", "nlist": nlist},
              [{"nprobe": p} for p in (8, 16, 32)], n, small, haswell),
             ("hnswlib", "hnswlib ip M=16 efC=80", {"M": 16, "efc": 80}, ef, n, small, {}),
             ("hnswlib", "hnswlib ip M=32 efC=80", {"M": 32, "efc": 80}, ef, n, None, {}),
             ("usearch", "usearch ip f32 (connectivity 16)", {"dtype": "f32"}, ef, n, small, {}),
             ("usearch", "usearch ip f16 (connectivity 16)", {"dtype": "f16"},
              ef3 if full_grid or n <= GRID_UP_TO else ef, n, None, {})]
    return [{"lib": lib, "label": label, "build": build, "search": search, "queries": q, "up_to": up_to, "env": env}
            for lib, label, build, search, q, up_to, env in specs]


def run_worker(spec: dict, rows: Path, tag: str) -> dict | None:
    """One candidate in a fresh process on THREADS threads: its result with the searches' arrays, or None."""
    out = WORK / tag
    spec = {**spec, "rows": str(rows), "out": str(out)}
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "OPENBLAS_NUM_THREADS": str(THREADS),
           "MKL_NUM_THREADS": str(THREADS), **spec["env"]}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        print(f"  {spec['label']}: failed ({proc.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    result = json.loads(Path(f"{out}.json").read_text())
    result["arrays"] = []
    for j in range(len(spec["search"])):
        with np.load(f"{out}-{j}.npz") as data:
            result["arrays"].append((data["sims"], data["idx"]))
        Path(f"{out}-{j}.npz").unlink()
    Path(f"{out}.json").unlink()
    return result


def others(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 10 nearest other images of each row, most similar first (as checks._others, the image itself dropped)."""
    s = np.where((idx == np.arange(len(idx))[:, None]) | (idx < 0), -np.inf, sims)
    order = np.argsort(-s, axis=1, kind="stable")[:, :K - 1]
    return np.take_along_axis(s, order, 1), np.take_along_axis(idx, order, 1)


def pairs(sims: np.ndarray, idx: np.ndarray, cols: int, threshold: float, n: int) -> np.ndarray:
    """Unordered pairs (as a * n + b, a < b) of each row and its first `cols` others from `threshold`."""
    r, c = np.nonzero(sims[:, :cols] >= threshold)
    a, b = r, idx[r, c]
    return np.unique(np.minimum(a, b) * n + np.maximum(a, b))


def share(found: np.ndarray, truth: np.ndarray) -> float | None:
    return float(np.isin(truth, found).mean()) if len(truth) else None


def scores(got: tuple, exact: tuple, planted: dict, n: int) -> dict:
    """A search's scores against exact search, over the rows it searched (the first q)."""
    q = len(got[0])
    gs, gi = others(*got)
    es, ei = others(exact[0][:q], exact[1][:q])
    near = [pairs(s, i, K - 1, NEAR, n) for s, i in ((es, ei), (gs, gi))]
    checked = [pairs(s, i, CHECKED, CHECKED_COSINE, n) for s, i in ((es, ei), (gs, gi))]
    truth = {name: np.minimum(p["rows"], p["bases"]) * n + np.maximum(p["rows"], p["bases"])
             for name, p in planted.items()}
    truth = {name: t[(t // n) < q] for name, t in truth.items()}  # pairs whose first row was searched
    return {"recall10": float((gi[:, :, None] == ei[:, None, :]).any(2).mean()),
            "near_pairs": len(near[0]), "near_recall": share(near[1], near[0]),
            "near_extra": int((~np.isin(near[1], near[0])).sum()),
            "checked_pairs": len(checked[0]), "checked_recall": share(checked[1], checked[0]),
            "kth_mae": float(np.abs(gs[:, OFFTOPIC_K - 1] - es[:, OFFTOPIC_K - 1]).mean()),
            "planted_near": share(near[1], truth["near"]), "planted_loose": share(checked[1], truth["loose"]),
            "exact_planted_near": share(near[0], truth["near"]),
            "exact_planted_loose": share(checked[0], truth["loose"])}


def agreement(got: tuple, exact: tuple) -> dict:
    """How far an exact library's neighbours are from numpy's: rows whose 11 differ, and the largest gap in
    similarity between the two lists' k-th entries (ties and float32 rounding reorder near-equal neighbours)."""
    q = len(got[0])
    differ = (np.sort(got[1], 1) != np.sort(exact[1][:q], 1)).any(1)
    gap = np.abs(np.sort(got[0], 1) - np.sort(exact[0][:q], 1)).max()
    return {"rows": q, "rows_differing": int(differ.sum()), "max_similarity_gap": float(gap)}


def setting_label(setting: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in setting.items()) or "-"


def summarise(spec: dict, runs: list[dict], exact: tuple, planted: dict, n: int) -> list[dict]:
    """A record per search setting: median times over the runs, scores of the first run."""
    records = []
    scale = n / spec["queries"]
    for j, setting in enumerate(spec["search"]):
        build = statistics.median(r["build_s"] for r in runs)
        query = statistics.median(r["query_s"][j] * scale for r in runs)
        total = statistics.median(r["build_s"] + r["query_s"][j] * scale for r in runs)
        cpu = statistics.median(r["build_cpu_s"] + r["query_cpu_s"][j] * scale for r in runs)
        same = None
        if len(runs) > 1:
            same = all(np.array_equal(a, b) for a, b in zip(runs[0]["arrays"][j], runs[1]["arrays"][j], strict=True))
        record = {"n": n, "lib": spec["lib"], "label": spec["label"], "build": spec["build"], "search": setting,
                  "queries": spec["queries"], "estimated": scale > 1, "runs": len(runs), "build_s": build,
                  "query_s": query, "total_s": total, "same_twice": same, "total_cpu_s": cpu,
                  "peak_rss_mb": max(r["peak_rss"] for r in runs) / 2**20,
                  "lib_bytes_per_image": runs[0]["lib_bytes"] / n,
                  "rss_delta_bytes_per_image": runs[0]["rss_delta"] / n,
                  **scores(runs[0]["arrays"][j], exact, planted, n)}
        if spec["lib"] in ("sklearn", "faiss") and spec["build"].get("kind", "flat") == "flat":
            record["agreement"] = agreement(runs[0]["arrays"][j], exact)
        records.append(record)
    return records


def cached_exact(n: int, seed: int, real: np.ndarray) -> tuple[Path, str]:
    """Where numpy's exact result for these rows is kept, and the fingerprint of the features they come from."""
    return WORK / f"exact-{n}-{seed}.npz", f"{real.shape}:{float(real.sum(dtype=np.float64)):.6e}"


def run_size(n: int, real: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Every candidate at size n (numpy's exact search first: the truth); (the size's facts, its records)."""
    WORK.mkdir(parents=True, exist_ok=True)
    rows, (keep, stamp) = WORK / f"rows-{n}.npy", cached_exact(n, args.seed, real)
    started = time.perf_counter()
    planted = make_rows(real, labels, n, args.seed, rows)
    info = {"n": n, "rows_mb": n * real.shape[1] * 4 / 2**20, "make_s": time.perf_counter() - started,
            "load_average": os.getloadavg()[0],
            **{f"planted_{k}_cosine": [float(v["cosine"].min()), float(v["cosine"].max())] for k, v in planted.items()}}
    print(f"\nN={n}: rows made in {info['make_s']:.0f} s; load average {info['load_average']:.1f}", flush=True)
    exact, records = None, []
    if args.reuse_exact and keep.exists() and str(np.load(keep)["stamp"]) == stamp:
        exact = (np.load(keep)["sims"], np.load(keep)["idx"])
        print(f"  exact neighbours from {keep} (numpy's search not timed in this run)", flush=True)
    for c, spec in enumerate(candidates(n, args.full_exact, args.full_grid)):
        if (spec["lib"] == "numpy" and exact is not None) or (args.only and spec["lib"] not in {"numpy", *args.only}):
            continue
        if spec["up_to"] and n > spec["up_to"]:
            print(f"  {spec['label']}: left out above {spec['up_to']:,} (time; --full-grid runs it)", flush=True)
            continue
        if find_spec(MODULES[spec["lib"]]) is None:
            print(f"  {spec['label']}: skipped ({MODULES[spec['lib']]} is not installed)", flush=True)
            continue
        runs = [run_worker(spec, rows, f"{n}-{c}-{r}") for r in range(2 if n <= args.twice_up_to else 1)]
        if None in runs:
            continue
        if exact is None:
            exact = runs[0]["arrays"][0]
            np.savez(keep, sims=exact[0], idx=exact[1], stamp=stamp)
        records += summarise(spec, runs, exact, planted, n)
        r = records[-1]
        print(f"  {spec['label']}: build {r['build_s']:.1f} s, query {r['query_s']:.1f} s{' (est.)' * r['estimated']}"
              f", recall@10 {r['recall10']:.4f}, peak {r['peak_rss_mb']:.0f} MB", flush=True)
    rows.unlink()
    nearest_other = others(*exact)[0]
    info.update({f"exact_{q}": [float(v) for v in np.percentile(nearest_other[:, k], [5, 50, 95])]
                 for q, k in (("1st_other_cosine", 0), ("5th_other_cosine", OFFTOPIC_K - 1))})
    info["exact_scores"] = scores(exact, exact, planted, n)
    return info, records


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(info: dict, records: list[dict]) -> None:
    base = next(((r["total_s"], r["total_cpu_s"]) for r in records if r["lib"] == "sklearn"), (None, None))
    print(f"\n### N = {info['n']:,} (rows {info['rows_mb']:.0f} MB; exact nearest-other cosine 5/50/95th percentile "
          f"{'/'.join(f'{v:.2f}' for v in info['exact_1st_other_cosine'])}, 5th nearest "
          f"{'/'.join(f'{v:.2f}' for v in info['exact_5th_other_cosine'])}; load average {info['load_average']:.1f})")
    r0 = info["exact_scores"]
    print(f"exact pairs: {r0['near_pairs']} near-duplicate (>= {NEAR}), {r0['checked_pairs']} keypoint candidates; "
          f"exact search finds {r0['exact_planted_near']:.1%} of the planted near copies "
          f"(cosine {info['planted_near_cosine'][0]:.3f}-{info['planted_near_cosine'][1]:.3f}) and "
          f"{r0['exact_planted_loose']:.1%} of the looser ones ({info['planted_loose_cosine'][0]:.3f}-"
          f"{info['planted_loose_cosine'][1]:.3f}) among its keypoint candidates")
    for r in records:
        if "agreement" in r:
            a = r["agreement"]
            print(f"{r['label']} vs numpy exact: {a['rows_differing']} of {a['rows']} rows' 11 neighbours differ; "
                  f"largest similarity gap {a['max_similarity_gap']:.1e}")
    print("\n| candidate | search | build s | query s | total s | CPU s | x sklearn (CPU) | recall@10 | near-dup pairs "
          "| keypoint pairs | 5th-sim MAE | planted near / loose | bytes/img (lib) | bytes/img (RSS delta) "
          "| peak RSS MB | same twice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        est = " est." if r["estimated"] else ""
        first = f" (first {r['queries']:,} rows)" if r["estimated"] else ""
        same = "-" if r["same_twice"] is None else "yes" if r["same_twice"] else "no"
        planted = "-" if r["estimated"] else f"{fmt(r['planted_near'], '.1%')} / {fmt(r['planted_loose'], '.1%')}"
        print(f"| {r['label']} | {setting_label(r['search'])} | {r['build_s']:.1f} | {r['query_s']:.1f}{est} "
              f"| {r['total_s']:.1f}{est} | {r['total_cpu_s']:.1f} | {fmt(base[0] and base[0] / r['total_s'], '.1f')} "
              f"({fmt(base[1] and base[1] / r['total_cpu_s'], '.1f')}) | {r['recall10']:.4f}{first} "
              f"| {fmt(r['near_recall'], '.2%')} ({r['near_pairs']}, +{r['near_extra']}) "
              f"| {fmt(r['checked_recall'], '.2%')} | {r['kth_mae']:.1e} "
              f"| {planted} "
              f"| {r['lib_bytes_per_image']:.0f} | {r['rss_delta_bytes_per_image']:.0f} | {r['peak_rss_mb']:.0f} "
              f"| {same} |")


def wheel_matrix() -> dict:
    """{package: {platform: {python: wheel file name or None}}}, from `pip download --only-binary=:all:`."""
    matrix: dict = {}
    for package in WHEEL_PACKAGES:
        for platform, tags in PLATFORMS.items():
            for python in PYTHONS:
                dest = WHEELS / package / python / platform.replace(" ", "-")
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                                "--python-version", python, *(f"--platform={t}" for t in tags), "-d", str(dest),
                                package], capture_output=True)
                found = sorted(p.name for p in dest.glob("*.whl"))
                matrix.setdefault(package, {}).setdefault(platform, {})[python] = found[0] if found else None
    print("\n| package | platform | " + " | ".join(f"Python {p}" for p in PYTHONS) + " |")
    print("|---|---|" + "---|" * len(PYTHONS))
    for package, platforms in matrix.items():
        for platform, pythons in platforms.items():
            cells = [f"{w.split('-')[1]} ({w.split('-')[-1].removesuffix('.whl')})" if w else "none"
                     for w in pythons.values()]
            print(f"| {package} | {platform} | " + " | ".join(cells) + " |")
    return matrix


def numpy_gemm_gflops() -> float:
    """Best of five fp32 4096x4096 matmuls in numpy (its BLAS, all cores): this machine's ceiling now."""
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 4096**3 / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000])
    parser.add_argument("--features", type=Path, help="real pooled features: .npy [n, 1280] or .npz (pooled, labels)")
    parser.add_argument("--only", nargs="+", choices=[m for m in MODULES if m != "numpy"],
                        help="these libraries only (numpy's exact search always runs: it is the truth)")
    parser.add_argument("--full-exact", action="store_true", help="scikit-learn and faiss flat search every row")
    parser.add_argument("--full-grid", action="store_true", help=f"every setting above {GRID_UP_TO:,} too")
    parser.add_argument("--twice-up-to", type=int, default=10000, help="run sizes up to this twice (medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-exact", action="store_true",
                        help=f"take exact neighbours from an earlier run's {WORK}/exact-N-SEED.npz (numpy not timed)")
    parser.add_argument("--wheels", action="store_true", help="also list wheels for Python 3.10-3.13 (pip download)")
    parser.add_argument("--json", type=Path, help="write every record here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    real, labels = load_real(args.features)
    from scaling import host_line

    started = time.perf_counter()
    host = f"{host_line()}; numpy fp32 4096^2 GEMM {numpy_gemm_gflops():.0f} GFLOP/s"
    print(f"host: {host}; load average {os.getloadavg()[0]:.1f}", flush=True)
    versions = {m: getattr(__import__(m), "__version__", "?") for m in MODULES.values() if find_spec(m)}
    print("versions: " + ", ".join(f"{m} {v}" for m, v in versions.items()), flush=True)
    sizes = []
    for n in args.sizes:
        sizes.append(run_size(n, real, labels, args))
        print_table(*sizes[-1])
        write_json(args.json, host, versions, started, sizes)
    matrix = wheel_matrix() if args.wheels else None
    write_json(args.json, host, versions, started, sizes, matrix)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


def write_json(path: Path | None, host: str, versions: dict, started: float, sizes: list, wheels=None) -> None:
    """Everything so far (rewritten after each size, so a long run that is stopped keeps what it measured)."""
    if path:
        path.write_text(json.dumps({"host": host, "versions": versions, "wall_s": time.perf_counter() - started,
                                    "wheels": wheels, "sizes": [{"info": i, "records": r} for i, r in sizes]},
                                   indent=1))

if __name__ == "__main__":
    main()
