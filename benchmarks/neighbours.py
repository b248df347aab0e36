"""Nearest neighbours for `mobiletune audit`: the shipped search against scikit-learn's brute force and HNSW libraries.

    .venv/bin/python benchmarks/neighbours.py [--sizes 10000 ...] [--features FILE.npy|.npz] [--seed 0] [--json OUT]

What `audit.checks.nearest` computes: each of N images' 11 nearest images (itself included) by cosine over 1,280-d
pooled features. Candidates, each in a fresh process on 2 threads (OMP/OPENBLAS/MKL_NUM_THREADS and the library's
own setting); wall and CPU seconds are the whole search, normalising included, after its imports and the rows' load:
- mobiletune exact: `features.neighbours.nearest`, EXACT_UP_TO forced above N. Its result is the truth the others
  are scored against (tests/test_neighbours.py holds it to scikit-learn's);
- mobiletune graph: `nearest`, EXACT_UP_TO forced to 0: what it ships above 100,000 rows (faiss HNSWSQ, float16 rows);
- scikit-learn brute cosine, the search `nearest` replaced; above 50,000 rows (tens of minutes) only on the first
  5,000 rows, its times scaled by N / 5,000 ("est.");
- hnswlib and usearch at their best settings in the earlier grid, where importable (the venv, else /tmp/ann/lib).
Peak RSS is the worker's VmHWM, the rows (N x 5,120 bytes) included (ru_maxrss would carry the parent's peak over
from the fork). "x sklearn": scikit-learn's time over the candidate's, in the same run.

Scores against the truth, the image itself ignored: recall@10; near-duplicate pairs (cosine >=
audit.checks.NEAR_DUPLICATE_COSINE among the 10 nearest others, found from either side, by the candidate's own
similarity; "+n": pairs the truth does not have); planted copies found (near copies by that rule, looser ones among
the keypoint candidates: each image's audit.checks.CHECKED nearest from CHECKED_COSINE).

Rows are made from real pooled MobileNetV2 features: --features (an array [n, 1280], one class, or an .npz with
`pooled` and optionally `labels`), else /tmp/exp/sets (cats_and_dogs_filtered, 3,000 photos, and flowers_mini, 200),
else synthetic clustered non-negative rows (said in the output: their timings hold, their scores say less). Seeded
by (seed, N), each row mixes 2 or 3 photos of one class (Dirichlet weights), every feature scaled by lognormal noise
(sigma 0.35) and 15% of them zeroed (a third of real pooled features are 0). Then 1% of the rows are replaced by
near copies of other rows (per-feature lognormal noise, its sigma bisected to land at a cosine drawn from 0.90-0.98)
and 1% by looser copies (0.65-0.85), so the near-duplicate rule and the keypoint candidates both have planted truth.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import numpy as np

# appended, not put first: /tmp/ann/lib holds a faiss too, and the graph must run on the venv's (mobiletune's own)
sys.path.append("/tmp/ann/lib")
SETS = Path("/tmp/exp/sets")
REAL = ("full-cats_and_dogs_filtered.npz", "full-flowers_mini.npz")
THREADS = 2  # the cores of the machine the audit's timings are quoted for
SKLEARN_FULL_UP_TO, SKLEARN_SUBSET = 50_000, 5_000
GEN_CHUNK = 8192  # rows generated at a time, so making 200,000 rows holds ~40 MB of temporaries, not 1 GB
SIGMA, DROP = 0.35, 0.15  # per-feature lognormal noise and share of features zeroed, in every generated row
SHIPPED = "mobiletune.features.neighbours"
# label, search (SEARCHES), the modules it imports before the clock starts (import time is no candidate's); the
# first is the truth
CANDIDATES = (("mobiletune exact", "exact", [SHIPPED]),
              ("mobiletune graph (faiss HNSWSQ fp16 M=32 efC=40 ef 64)", "graph", [SHIPPED, "faiss"]),
              ("mobiletune graph, 8-bit rows (HNSWSQ QT_8bit)", "graph8", [SHIPPED, "faiss"]),
              ("scikit-learn brute cosine (previous)", "sklearn", ["sklearn.neighbors", "threadpoolctl"]),
              ("hnswlib ip M=32 efC=80 ef 64", "hnswlib", ["hnswlib"]),
              ("usearch ip f16 connectivity 16 ef 64", "usearch", ["usearch.index"]))
DISTRIBUTIONS = {"numpy": "numpy", "sklearn": "scikit-learn", "faiss": "faiss-cpu", "hnswlib": "hnswlib",
                 "usearch": "usearch"}


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and labels from an .npy (one class) or an .npz (`pooled`, optionally `labels`)."""
    data = np.load(path)
    pooled = data if isinstance(data, np.ndarray) else data["pooled"]
    labels = np.zeros(len(pooled)) if isinstance(data, np.ndarray) or "labels" not in data.files else data["labels"]
    return pooled.astype(np.float32), labels.astype(np.int64)


def load_real(features: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Pooled features to make rows from, their class labels, and where they came from (module docstring)."""
    sets = f"{SETS}/{{{','.join(REAL)}}}"
    if features is not None:
        parts, source = [read(features)], str(features)
    elif all((SETS / name).exists() for name in REAL):
        parts, source = [read(SETS / name) for name in REAL], sets
    else:
        parts, source = [synthetic()], f"SYNTHETIC clustered non-negative rows (no --features, no {sets})"
    offset = np.cumsum([0] + [lab.max() + 1 for _, lab in parts])  # each set's classes numbered after the last's
    labels = np.concatenate([lab + offset[i] for i, (_, lab) in enumerate(parts)])
    return np.concatenate([p for p, _ in parts]), labels, f"{source}: {len(labels):,} photos, {offset[-1]} classes"


def synthetic(photos: int = 3200, classes: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stand-ins for pooled features: non-negative (they come out of ReLU6 and a mean), many exactly 0, clustered
    by class, so that rows of a class are near one another as photos of a class are."""
    rng = np.random.default_rng(seed)
    centres = np.maximum(rng.normal(0.2, 1.0, (classes, 1280)), 0)
    labels = rng.integers(0, classes, photos)
    pooled = np.maximum(centres[labels] + rng.normal(0, 0.7, (photos, 1280)), 0)
    return pooled.astype(np.float32), labels.astype(np.int64)


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
    for s in range(0, n, GEN_CHUNK):
        e = min(n, s + GEN_CHUNK)
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


def unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised, float32 (a zero row stays zero), as `nearest` normalises them."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def search_mobiletune(rows: np.ndarray, k: int, queries: int, exact_up_to: int, graph_rows: str = "fp16") -> tuple:
    from mobiletune.features import neighbours

    # `nearest` reads them at each call: exact at or below EXACT_UP_TO, the graph above, its rows kept so
    neighbours.EXACT_UP_TO, neighbours.GRAPH_ROWS = exact_up_to, graph_rows
    return neighbours.nearest(rows, k)


def search_sklearn(rows: np.ndarray, k: int, queries: int) -> tuple:
    """The previous `nearest`: NearestNeighbors(metric="cosine") fitted on the raw rows, BLAS held to THREADS."""
    from sklearn.neighbors import NearestNeighbors
    from threadpoolctl import threadpool_limits

    with threadpool_limits(THREADS):
        distances, ids = NearestNeighbors(n_neighbors=k, metric="cosine").fit(rows).kneighbors(rows[:queries])
    return 1 - distances, ids


def search_hnswlib(rows: np.ndarray, k: int, queries: int) -> tuple:
    import hnswlib

    x = unit(rows)
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), ef_construction=80, M=32, random_seed=100)
    index.add_items(x, np.arange(len(x)), num_threads=THREADS)
    index.set_ef(64)
    ids, distances = index.knn_query(x[:queries], k=k, num_threads=THREADS)
    return 1 - distances, ids


def search_usearch(rows: np.ndarray, k: int, queries: int) -> tuple:
    from usearch.index import Index

    x = unit(rows)
    index = Index(ndim=x.shape[1], metric="ip", dtype="f16", connectivity=16, expansion_search=64)
    index.add(np.arange(len(x), dtype=np.uint64), x, threads=THREADS)
    found = index.search(x[:queries], k, threads=THREADS)
    ids = found.keys.astype(np.int64)
    ids[np.arange(k)[None, :] >= found.counts[:, None]] = -1  # fewer than k found: the rest are not neighbours
    return 1 - found.distances, ids


SEARCHES = {"exact": lambda rows, k, q: search_mobiletune(rows, k, q, exact_up_to=len(rows)),
            "graph": lambda rows, k, q: search_mobiletune(rows, k, q, exact_up_to=0),
            "graph8": lambda rows, k, q: search_mobiletune(rows, k, q, exact_up_to=0, graph_rows="sq8"),
            "sklearn": search_sklearn, "hnswlib": search_hnswlib, "usearch": search_usearch}


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (module docstring), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def worker(spec: dict) -> None:
    """One candidate's search over spec["rows"]; writes its neighbours, times and peak RSS to spec["out"]."""
    for module in spec["imports"]:
        importlib.import_module(module)
    rows = np.load(spec["rows"])
    started, cpu = time.perf_counter(), time.process_time()
    sims, ids = SEARCHES[spec["search"]](rows, spec["k"], spec["queries"])
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    np.savez(spec["out"], sims=np.asarray(sims, np.float32), ids=np.asarray(ids, np.int64), wall_s=wall, cpu_s=cpu,
             peak_rss=peak_rss())


def run_worker(label: str, spec: dict) -> dict | None:
    """One candidate in a fresh process on THREADS threads: its neighbours and measurements, or None if it failed."""
    env = {**os.environ, **dict.fromkeys(["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"], str(THREADS))}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        print(f"  {label}: failed (exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    with np.load(spec["out"]) as data:
        result = {key: data[key] if data[key].ndim else data[key].item() for key in data.files}
    Path(spec["out"]).unlink()
    return result


def others(sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest other images, most similar first (as the audit reads them: the image itself dropped)."""
    s = np.where((ids == np.arange(len(ids))[:, None]) | (ids < 0), -np.inf, sims)
    order = np.argsort(-s, axis=1, kind="stable")[:, :s.shape[1] - 1]
    return np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)


def pairs(sims: np.ndarray, ids: np.ndarray, threshold: float, n: int) -> np.ndarray:
    """Unordered pairs (as a * n + b, a < b) of each row and its listed others from `threshold`."""
    r, c = np.nonzero(sims >= threshold)
    a, b = r, ids[r, c]
    return np.unique(np.minimum(a, b) * n + np.maximum(a, b))


def share(found: np.ndarray, truth: np.ndarray) -> float | None:
    return float(np.isin(truth, found).mean()) if len(truth) else None


def scores(got: tuple, truth: tuple, planted: dict, n: int) -> dict:
    """A search's scores against the truth, over the rows it searched (the first q). Planted copies only where it
    searched every row: a pair is often found from its other row."""
    # imported here, in the parent only: at the top every worker would load the mobiletune package (~20 MB) into the
    # peak RSS it reports, the other libraries' included
    from mobiletune.audit.checks import CHECKED, CHECKED_COSINE, NEAR_DUPLICATE_COSINE

    q = len(got[0])
    gs, gi = others(*got)
    ts, ti = others(truth[0][:q], truth[1][:q])
    near = [pairs(s, i, NEAR_DUPLICATE_COSINE, n) for s, i in ((ts, ti), (gs, gi))]
    checked = [pairs(s[:, :CHECKED], i[:, :CHECKED], CHECKED_COSINE, n) for s, i in ((ts, ti), (gs, gi))]
    copied = {name: np.minimum(p["rows"], p["bases"]) * n + np.maximum(p["rows"], p["bases"])
              for name, p in planted.items()}
    whole = q == n
    return {"queries": q, "recall10": float((gi[:, :, None] == ti[:, None, :]).any(2).mean()),
            "near_pairs": len(near[0]), "near_recall": share(near[1], near[0]),
            "near_extra": int((~np.isin(near[1], near[0])).sum()),
            "planted_near": share(near[1], copied["near"]) if whole else None,
            "planted_loose": share(checked[1], copied["loose"]) if whole else None}


def agreement(got: tuple, truth: tuple) -> dict:
    """How far an exact search's neighbours are from the truth's: rows whose 11 differ, and the largest gap in
    similarity between the two lists' sorted entries (ties and float32 rounding reorder near-equal neighbours)."""
    q = len(got[0])
    differ = (np.sort(got[1], 1) != np.sort(truth[1][:q], 1)).any(1)
    gap = np.abs(np.sort(got[0], 1) - np.sort(truth[0][:q], 1)).max()
    return {"rows": q, "rows_differing": int(differ.sum()), "max_similarity_gap": float(gap)}


def run_size(n: int, real: np.ndarray, labels: np.ndarray, seed: int, work: Path,
             searches: set[str]) -> tuple[dict, list[dict]]:
    """The candidates in `searches` at size n, the truth first: (the size's facts, a record per candidate)."""
    from mobiletune.audit.checks import NEIGHBOURS

    rows, started = work / f"rows-{n}.npy", time.perf_counter()
    planted = make_rows(real, labels, n, seed, rows)
    info = {"n": n, "rows_mb": n * real.shape[1] * 4 / 2**20, "make_s": time.perf_counter() - started,
            "load_average": os.getloadavg()[0],
            **{f"planted_{k}_cosine": [float(v["cosine"].min()), float(v["cosine"].max())] for k, v in planted.items()}}
    print(f"\nN={n:,}: rows made in {info['make_s']:.0f} s; load average {info['load_average']:.1f}", flush=True)
    truth, records = None, []
    for label, search, imports in (c for c in CANDIDATES if c[1] in searches):
        missing = [m.split(".")[0] for m in imports if find_spec(m.split(".")[0]) is None]
        if missing:
            print(f"  {label}: skipped ({', '.join(missing)} not installed)", flush=True)
            continue
        q = SKLEARN_SUBSET if search == "sklearn" and n > SKLEARN_FULL_UP_TO else n
        spec = {"search": search, "imports": imports, "rows": str(rows), "out": str(work / f"{search}-{n}.npz"),
                "k": NEIGHBOURS + 1, "queries": q}
        got = run_worker(label, spec)
        if got is None:  # without the truth, the first, there is nothing to score against
            if truth is None:
                break
            continue
        found = (got["sims"], got["ids"])
        if truth is None:
            truth = found
        scale = n / q
        record = {"label": label, "search": search, "estimated": scale > 1, "wall_s": got["wall_s"] * scale,
                  "cpu_s": got["cpu_s"] * scale, "peak_rss_mb": got["peak_rss"] / 2**20,
                  **scores(found, truth, planted, n)}
        if search == "sklearn":
            record["agreement"] = agreement(found, truth)
        records.append(record)
        print(f"  {label}: {record['wall_s']:.1f} s{' (est.)' * record['estimated']}, recall@10 "
              f"{record['recall10']:.4f}, peak {record['peak_rss_mb']:.0f} MB", flush=True)
    rows.unlink()
    if truth is not None:
        info["truth"] = scores(truth, truth, planted, n)
    return info, records


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(info: dict, records: list[dict]) -> None:
    """The size's facts, then one markdown row per candidate."""
    from mobiletune.audit.checks import CHECKED, CHECKED_COSINE, NEAR_DUPLICATE_COSINE

    print(f"\n### N = {info['n']:,} (rows {info['rows_mb']:.0f} MB; load average {info['load_average']:.1f})")
    if "truth" not in info:
        return
    t, near, loose = info["truth"], info["planted_near_cosine"], info["planted_loose_cosine"]
    print(f"truth (mobiletune exact): {t['near_pairs']} near-duplicate pairs (cosine >= {NEAR_DUPLICATE_COSINE}); "
          f"it finds {fmt(t['planted_near'], '.1%')} of the planted near copies (cosine {near[0]:.3f}-{near[1]:.3f})"
          f" and {fmt(t['planted_loose'], '.1%')} of the looser ones ({loose[0]:.3f}-{loose[1]:.3f}) among its "
          f"keypoint candidates ({CHECKED} nearest from {CHECKED_COSINE})")
    for r in records:
        if "agreement" in r:
            a = r["agreement"]
            print(f"{r['label']} vs the truth: {a['rows_differing']} of {a['rows']:,} rows' 11 neighbours differ; "
                  f"largest similarity gap {a['max_similarity_gap']:.1e}")
    base = next(((r["wall_s"], r["cpu_s"]) for r in records if r["search"] == "sklearn"), None)
    print("\n| candidate | wall s | CPU s | x sklearn (CPU) | recall@10 | near-dup pairs found | planted near / loose "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        est = " est." if r["estimated"] else ""
        rows = f" (first {r['queries']:,} rows)" if r["estimated"] else ""
        faster = f"{base[0] / r['wall_s']:.1f} ({base[1] / r['cpu_s']:.1f})" if base else "-"
        print(f"| {r['label']} | {r['wall_s']:.1f}{est} | {r['cpu_s']:.1f}{est} | {faster} | {r['recall10']:.4f}{rows} "
              f"| {fmt(r['near_recall'], '.2%')} ({r['near_pairs']}, +{r['near_extra']}) "
              f"| {fmt(r['planted_near'], '.1%')} / {fmt(r['planted_loose'], '.1%')} | {r['peak_rss_mb']:.0f} |")


def numpy_gemm_gflops() -> float:
    """Best of six fp32 4096x4096 matmuls in numpy (its BLAS, all cores): this machine's ceiling now."""
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    b, best = a.T.copy(), 0.0
    for _ in range(6):  # the first warms up, and is slower
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 4096**3 / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000])
    parser.add_argument("--features", type=Path, help="real pooled features: .npy [n, 1280] or .npz (pooled, labels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every record here (rewritten after each size)")
    parser.add_argument("--searches", nargs="+", choices=list(SEARCHES), default=list(SEARCHES),
                        help="the candidates to run (exact, the truth, always runs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    from scaling import host_line

    started = time.perf_counter()
    host = f"{host_line()}; numpy fp32 4096^2 GEMM {numpy_gemm_gflops():.0f} GFLOP/s"
    print(f"host: {host}; load average {os.getloadavg()[0]:.1f}", flush=True)
    installed = {dist: metadata.version(dist) for module, dist in DISTRIBUTIONS.items() if find_spec(module)}
    print("versions: " + ", ".join(f"{d} {v}" for d, v in installed.items()), flush=True)
    real, labels, source = load_real(args.features)
    print(f"features: {source}", flush=True)
    sizes = []
    with tempfile.TemporaryDirectory(prefix="neighbours-") as work:
        for n in args.sizes:
            sizes.append(run_size(n, real, labels, args.seed, Path(work), {"exact", *args.searches}))
            print_table(*sizes[-1])
            if args.json:  # after each size, so a long run that is stopped keeps what it measured
                args.json.write_text(json.dumps({"host": host, "versions": installed, "features": source,
                                                 "wall_s": time.perf_counter() - started,
                                                 "sizes": [{"info": i, "records": r} for i, r in sizes]}, indent=1))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
