"""How `mobiletune train` scales with the number of images: wall time, peak RSS and cache size against N.

    .venv/bin/python benchmarks/scaling.py [--sizes 2000 10000 50000] [--incremental [--retrain]] [--epochs 2 2]
        [--views 2] [--image-size 160] [--set KEY=VALUE ...] [--drop-caches] [--workdir DIR] [--json PATH]
        [--plot PATH]
    .venv/bin/python benchmarks/scaling.py --json-in scaling.json --plot scaling.png   # re-plot only

cats_and_dogs_filtered has 1000 training images per class, too few to see how time and memory grow,
so each N-image set is generated: every file is a seeded random crop/flip/brightness variant of a
source image, saved as its own JPEG, so no two files share bytes (and a content-keyed feature
cache cannot collapse them). File i of a class depends only on (seed, class, i): a larger set
holds the smaller one's files byte for byte, which is what makes "add 1% more images" a fair
incremental run against a warm cache (--incremental, on the largest N).

Each N trains in its own `mobiletune train` process with a fresh feature cache; the script takes
the child's wall time and peak RSS (wait4), reads the run's metrics.json, and prints one markdown
row per run, then writes the rows as JSON (and, with --plot, a log-log PNG).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cats_and_dogs_filtered" / "train"
MOBILETUNE = REPO / ".venv" / "bin" / "mobiletune"
CLASSES = ("cats", "dogs")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
PROGRESS_EVERY = 5000


# --- generating the image sets ---------------------------------------------------------------------


def variant_name(i: int) -> str:
    """File name of a class's i-th generated image; fixed width so listings sort by i."""
    return f"gen_{i:06d}.jpg"


def make_variant(task: tuple[str, str, int, int, int]) -> None:
    """Write one seeded random variant (crop 70-100% per side, flip, brightness 0.8-1.2) of a source JPEG.

    The generator is seeded from (seed, class, i) alone, so the file is the same whatever N it is
    generated for. Written to a hidden temporary name and renamed, so an interrupted run never
    leaves a truncated JPEG that a rerun would skip as done.
    """
    from PIL import Image, ImageEnhance

    src, dst, seed, class_index, i = task
    rng = np.random.default_rng([seed, class_index, i])
    with Image.open(src) as opened:
        img = opened.convert("RGB")
    w, h = img.size
    cw = max(1, round(w * rng.uniform(0.7, 1.0)))
    ch = max(1, round(h * rng.uniform(0.7, 1.0)))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    out = Path(dst)
    tmp = out.with_name(f".{out.stem}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)


def source_images(src: Path, cls: str) -> list[Path]:
    """A class's source JPEGs in sorted order, so index i % len always names the same file."""
    files = sorted(p for p in (src / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        sys.exit(f"no JPEGs in {src / cls}")
    return files


def prune(folder: Path, count: int) -> int:
    """Remove generated files numbered count and up (and stale temporaries): the folder then holds exactly N."""
    removed = 0
    for p in folder.iterdir():
        stale_tmp = p.name.startswith(".gen_") and p.suffix == ".tmp"
        too_far = p.name.startswith("gen_") and p.stem[4:].isdigit() and int(p.stem[4:]) >= count
        if stale_tmp or too_far:
            p.unlink()
            removed += int(too_far)
    return removed


def make_set(src: Path, dst: Path, n: int, seed: int = 0, jobs: int = 2) -> Path:
    """Build an n-image two-class folder dst/cats, dst/dogs (cats take the odd one), skipping files that exist.

    Generating a larger n into the same folder only adds files; a smaller n removes the extra ones.
    """
    counts = {"cats": n - n // 2, "dogs": n // 2}
    tasks = []
    for class_index, cls in enumerate(CLASSES):
        sources = source_images(src, cls)
        folder = dst / cls
        folder.mkdir(parents=True, exist_ok=True)
        prune(folder, counts[cls])
        tasks += [(str(sources[i % len(sources)]), str(folder / variant_name(i)), seed, class_index, i)
                  for i in range(counts[cls]) if not (folder / variant_name(i)).exists()]
    if not tasks:
        return dst
    print(f"generating {len(tasks)} of {n} images into {dst} on {jobs} processes", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for done, _ in enumerate(pool.map(make_variant, tasks, chunksize=64), start=1):
            if done % PROGRESS_EVERY == 0:
                print(f"  {done}/{len(tasks)} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"  {len(tasks)} images in {time.perf_counter() - started:.0f} s", flush=True)
    return dst


# --- running and measuring mobiletune --------------------------------------------------------------


def disk_usage(path: Path) -> int:
    """Bytes on disk under path, like `du -s` (allocated blocks, hard links counted once)."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in [".", *files]:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides every run gets, from --epochs, --views, --image-size and --set."""
    sets = []
    if args.epochs:
        sets += [f"phase1.epochs={args.epochs[0]}", f"phase2.epochs={args.epochs[1]}"]
    if args.views is not None:
        sets.append(f"features.views={args.views}")
    if args.image_size is not None:
        sets.append(f"data.image_size={args.image_size}")
    return sets + list(args.set)


def run_train(data_dir: Path, run_dir: Path, cache: Path, overrides: list[str], log: Path,
              parent: Path | None = None) -> dict:
    """One `mobiletune train` in its own process: wall time and its peak RSS from wait4, then its metrics.json."""
    cmd = [str(MOBILETUNE), "train", str(data_dir), "--out", str(run_dir), "--overwrite", "--quiet",
           "--set", f"features.cache_dir={cache}", *(["--from", str(parent)] if parent else [])]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so it does not wait again
    if proc.returncode != 0:
        sys.exit(f"mobiletune train exited {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": wall, "peak_rss_mb_wait4": usage.ru_maxrss / 1024, "metrics": metrics}  # KiB on Linux


def row_from(n: int, kind: str, run: dict, cache: Path) -> dict:
    """The numbers one table row reports, read defensively since metrics.json may gain or lose keys."""
    m = run["metrics"]
    features = m.get("features") or {}
    n_images = m.get("n_images") or {}
    test = (m.get("after_fine_tuning") or {}).get("test") or {}
    after = test.get("accuracy")
    return {"n": n, "kind": kind, "n_images": n_images, "train_images": n_images.get("train"),
            "wall_s": run["wall_s"], "seconds": m.get("seconds") or {},
            "peak_rss_mb_wait4": run["peak_rss_mb_wait4"], "peak_rss_mb_metrics": m.get("peak_rss_mb"),
            "cache_mb": disk_usage(cache) / 2**20, "cache_bytes": features.get("cache_bytes"),
            "images_computed": features.get("images_computed"), "images_cached": features.get("images_cached"),
            "test_accuracy_after": after, "test_ci95": test.get("accuracy_ci95")}


# --- reporting -------------------------------------------------------------------------------------


def host_info() -> dict:
    """The CPU model and its widest SIMD (avx512f, else avx2): per-image times mean little without them."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or platform.processor() or "unknown"
    flags = set((fields.get("flags") or "").split())
    simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return {"model": model, "simd": simd, "cpus": os.cpu_count()}


def host_line() -> str:
    """The host in one phrase for a benchmark's first line: CPU, widest SIMD, cores, and any oneDNN ISA limit
    (ONEDNN_MAX_CPU_ISA=AVX2 stands in for an AVX2 host, docs/benchmarks.md)."""
    host = host_info()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{host['model']}, {host['simd']}, {host['cpus']} cores"
            + (f", ONEDNN_MAX_CPU_ISA={limit}" if limit else ""))


def fmt(value, spec: str = ".0f") -> str:
    """A number formatted, or '-' where the metrics did not have it."""
    return "-" if value is None else format(value, spec)


def per_image(row: dict) -> float | None:
    """Seconds per training image: the run's total (its wall time if metrics has none) over its train count."""
    total = row["seconds"].get("total", row["wall_s"])
    return total / row["train_images"] if row["train_images"] else None


def print_table(rows: list[dict], host: dict) -> None:
    """The markdown table, one column per phase that any run reported."""
    phases = list(dict.fromkeys(k for r in rows for k in r["seconds"]))
    first = next((per_image(r) for r in rows if r["kind"] == "cold" and per_image(r)), None)
    print(f"\nhost: {host['model']}, {host['simd']}, {host['cpus']} CPUs\n")
    print("| N | train images | wall s | " + "".join(f"{p} s | " for p in phases)
          + "s / train image | vs first | peak RSS MB (wait4) | peak RSS MB (metrics) | cache MB "
          "| computed / cached | test acc after |")
    print("|---" * (10 + len(phases)) + "|")
    for r in rows:
        spi = per_image(r)
        label = {"cold": f"{r['n']}", "incremental": f"{r['n']} (+1%, warm cache)",
                 "from": f"{r['n']} (+1%, --from)"}[r["kind"]]
        print(f"| {label} | {fmt(r['train_images'], 'd')} | {r['wall_s']:.0f} | "
              + "".join(f"{fmt(r['seconds'].get(p), '.1f')} | " for p in phases)
              + f"{fmt(spi, '.4f')} | {fmt(spi / first if spi and first else None, '.2f')} | "
              f"{r['peak_rss_mb_wait4']:.0f} | {fmt(r['peak_rss_mb_metrics'])} | {r['cache_mb']:.0f} | "
              f"{fmt(r['images_computed'], 'd')} / {fmt(r['images_cached'], 'd')} | "
              f"{fmt(r['test_accuracy_after'], '.2%')} |")
    for r in rows:
        if r["kind"] in ("incremental", "from"):
            cold = next((c for c in rows if c["kind"] == "cold" and c["n"] == r.get("from_n")), None)
            ratio = f", {r['wall_s'] / cold['wall_s']:.2f}x the cold run's {cold['wall_s']:.0f} s" if cold else ""
            how = "retrained --from the cold run" if r["kind"] == "from" else "from scratch, warm cache"
            print(f"\n+1% ({r.get('from_n')} -> {r['n']} images, {how}): {r['wall_s']:.0f} s{ratio}; "
                  f"computed {fmt(r['images_computed'], 'd')}, cached {fmt(r['images_cached'], 'd')}; "
                  f"test accuracy {fmt(r['test_accuracy_after'], '.2%')}, Wilson 95% {r.get('test_ci95')}")


def plot(result: dict, path: Path) -> None:
    """Log-log wall time and peak RSS against N, each with a dashed line of linear growth through the first N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]
    cold = sorted((r for r in rows if r["kind"] == "cold"), key=lambda r: r["n"])
    warm = [r for r in rows if r["kind"] == "incremental"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "wall_s", "wall time, s"), (axes[1], "peak_rss_mb_wait4", "peak RSS, MB")):
        ns = np.array([r["n"] for r in cold], dtype=float)
        ys = np.array([r[key] for r in cold], dtype=float)
        ax.plot(ns, ys, "o-", label="cold cache")
        if len(ns):
            ax.plot(ns, ys[0] * ns / ns[0], "--", color="grey", label="linear in N")
        if warm:
            ax.plot([r["n"] for r in warm], [r[key] for r in warm], "s", label="+1% images, warm cache")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns, [f"{n:,.0f}" for n in ns])  # label the measured N only: log minor labels collide
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("images in the set (N)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    host = result.get("host") or {}
    fig.suptitle(f"mobiletune train scaling — {host.get('model', '?')} ({host.get('simd', '?')}, "
                 f"{host.get('cpus', '?')} CPUs)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# --- driver ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000], help="set sizes N")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder holding cats/ and dogs/")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mobiletune-scaling"),
                        help="generated sets, caches, runs and logs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument("--jobs", type=int, default=2, help="processes generating images")
    parser.add_argument("--incremental", action="store_true",
                        help="after the largest N's cold run, add 1%% more images and train again on its cache")
    parser.add_argument("--retrain", action="store_true",
                        help="with --incremental: also retrain the +1%% set --from the cold run")
    parser.add_argument("--epochs", type=int, nargs=2, metavar=("P1", "P2"), help="phase 1 and phase 2 epochs")
    parser.add_argument("--views", type=int, help="features.views")
    parser.add_argument("--image-size", type=int, help="data.image_size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on (repeatable)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="delete each N's cache after its runs (its size is in the row): one on disk at a time")
    parser.add_argument("--generate-only", action="store_true", help="build the sets and stop")
    parser.add_argument("--json", type=Path, help="where to write the rows (default WORKDIR/scaling.json)")
    parser.add_argument("--json-in", type=Path, help="with --plot: re-plot a saved JSON, run nothing")
    parser.add_argument("--plot", type=Path, help="write a log-log PNG of wall time and peak RSS against N")
    args = parser.parse_args()
    if args.json_in and not args.plot:
        parser.error("--json-in only re-plots; give --plot PATH")
    return args


def main() -> None:
    args = parse_args()
    if args.json_in:
        plot(json.loads(args.json_in.read_text()), args.plot)
        return
    host = host_info()
    print(f"host: {host['model']}, {host['simd']}, {host['cpus']} CPUs", flush=True)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.generate_only:
        for n in args.sizes:
            make_set(args.source, work / f"set-{n}", n, args.seed, args.jobs)
        return
    if not MOBILETUNE.exists():
        sys.exit(f"{MOBILETUNE} not found; install the project into .venv first")
    overrides = train_overrides(args)
    rows = []
    for n in args.sizes:
        data_dir = make_set(args.source, work / f"set-{n}", n, args.seed, args.jobs)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: nothing cached from an earlier invocation
        print(f"N={n}: training (cold cache)", flush=True)
        rows.append(row_from(n, "cold", run_train(data_dir, work / f"run-{n}", cache, overrides,
                                                  work / f"run-{n}.log"), cache))
        print(f"N={n}: {rows[-1]['wall_s']:.0f} s, peak RSS {rows[-1]['peak_rss_mb_wait4']:.0f} MB", flush=True)
        if args.incremental and n == max(args.sizes):
            grown = int(n * 1.01)
            make_set(args.source, data_dir, grown, args.seed, args.jobs)
            print(f"N={grown}: training (+1% images, warm cache)", flush=True)
            run = run_train(data_dir, work / f"run-{n}-plus1pct", cache, overrides, work / f"run-{n}-plus1pct.log")
            rows.append(dict(row_from(grown, "incremental", run, cache), from_n=n))
            if args.retrain:  # the same +1%, retrained from the cold run (its own schedule, not --epochs)
                print(f"N={grown}: training --from the N={n} run", flush=True)
                kept = [o for o in overrides if not o.startswith(("phase1.epochs=", "phase2.epochs="))]
                run = run_train(data_dir, work / f"run-{n}-from", cache, kept, work / f"run-{n}-from.log",
                                parent=work / f"run-{n}")
                rows.append(dict(row_from(grown, "from", run, cache), from_n=n))
        if args.drop_caches:
            shutil.rmtree(cache, ignore_errors=True)
    result = {"host": host, "argv": sys.argv[1:], "overrides": overrides, "rows": rows}
    out = args.json or work / "scaling.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(rows, host)
    print(f"\nrows: {out}")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
