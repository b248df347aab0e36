"""The frozen-feature pass on a Ray cluster against the local pass, on the same images (issue #33).

    .venv/bin/python benchmarks/ray_features.py [--images 1000] [--repeats 3] [--source DIR]

Takes `--images` photos of DIR's class folders (cats_and_dogs_filtered/train by default, linked, not copied)
and runs the default recipe's feature pass (160 px, its views, every split) into a new store each time:
- here: this process, ONNX Runtime on every core (what `mobiletune train` does without --ray);
- on real local Ray clusters started by this script on 127.0.0.1 (`tests/ray_local.py`): 1 node of 1 CPU,
  2 nodes of 1 CPU (the same cores as "here"), and for the settings: batches of 4/16/64 images per task, and
  one node of 2 CPUs with one 2-CPU actor against two 1-CPU actors.
Each way runs `--repeats` times; medians are printed, with Ray's overhead against the local pass in percent
(2 nodes x 1 CPU hold the same cores as the local pass). The time of a pass counts everything the user
waits for once connected: the actors' start (ONNX session from the shipped model), the images' bytes sent,
the results written into the store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from ray_local import LocalCluster  # noqa: E402
from scaling import host_line  # noqa: E402
from tutorial_vs_mobiletune import gemm_peak_gflops  # noqa: E402

SOURCE = HERE.parents[1] / "shared" / "data" / "cats_and_dogs_filtered" / "train"


def linked_subset(source: Path, count: int, into: Path) -> Path:
    """`count` images of `source`'s class folders, split evenly, as symbolic links under `into`."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    for n, folder in enumerate(classes):
        (into / folder.name).mkdir(parents=True)
        share = count // len(classes) + (n < count % len(classes))
        for image in sorted(folder.iterdir())[:share]:
            (into / folder.name / image.name).symlink_to(image.resolve())
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()

    from mobiletune.config import load_config
    from mobiletune.data import folders
    from mobiletune.features import cluster as cluster_lib
    from mobiletune.features import compute
    from mobiletune.model.network import create_model
    from mobiletune.quiet import import_tensorflow

    import_tensorflow()
    import ray

    print(f"{host_line()}; ray {ray.__version__}; fp32 GEMM ceiling {gemm_peak_gflops():.0f} GFLOP/s "
          "(best 4096x4096 tf.linalg.matmul)")
    config = load_config(overrides=[])
    scratch = Path(tempfile.mkdtemp(prefix="ray-features-"))
    images = folders.load_images(linked_subset(args.source, args.images, scratch / "images"), config.data)
    model = create_model(config, len(images.classes))
    runs = [0]

    def timed(ray_cluster) -> tuple[float, float, int]:
        """Wall seconds of one pass into a new store, this process's CPU seconds in it, items computed."""
        runs[0] += 1
        with cluster_lib.connected(ray_cluster):
            started, cpu = time.perf_counter(), time.process_time()
            feats = compute.compute_features(model, images, config, scratch / f"store-{runs[0]}")
            return time.perf_counter() - started, time.process_time() - cpu, feats.computed

    results: dict[str, list[float]] = {}
    driver: dict[str, list[float]] = {}  # CPU seconds of this process (every thread) in each pass
    items = 0

    def measure(label: str, ray_cluster=None) -> None:
        nonlocal items
        for _ in range(args.repeats):
            seconds, cpu, items = timed(ray_cluster)
            results.setdefault(label, []).append(seconds)
            driver.setdefault(label, []).append(cpu)
        print(f"  {label}: {', '.join(f'{s:.1f}' for s in results[label])} s", flush=True)

    print(f"{len(images.paths)} images, {config.data.image_size} px, {config.features.views} view(s) of each "
          f"training image; medians of {args.repeats}", flush=True)
    measure("here, 2 cores")
    for nodes, cpus, ways in ((1, 1, {"1 node x 1 CPU, batch 16": {}}),
                              (2, 1, {"2 nodes x 1 CPU, batch 16": {}, "2 nodes x 1 CPU, batch 4": {"batch": 4},
                                      "2 nodes x 1 CPU, batch 64": {"batch": 64}}),
                              (1, 2, {"1 node x 2 CPUs, 2 actors of 1 CPU": {},
                                      "1 node x 2 CPUs, 1 actor of 2 CPUs": {"cpus_per_actor": 2}})):
        started = LocalCluster(nodes=nodes, cpus=cpus)
        try:
            for label, settings in ways.items():
                measure(label, cluster_lib.RayCluster(started.address, **settings))
        finally:
            started.stop()
    measure("here, 2 cores, again")

    local = statistics.median(results["here, 2 cores"] + results["here, 2 cores, again"])
    print(f"\n{items} items a pass (views of training images, validation and test images)")
    print("| way | median s | items/s | against here | this process's CPU s |\n|---|---|---|---|---|")
    for label, seconds in results.items():
        median = statistics.median(seconds)
        print(f"| {label} | {median:.1f} | {items / median:.0f} | {100 * (median / local - 1):+.0f}% | "
              f"{statistics.median(driver[label]):.1f} |")
    two, one = (statistics.median(results[k]) for k in ("2 nodes x 1 CPU, batch 16", "1 node x 1 CPU, batch 16"))
    print(f"\nRay's overhead (2 nodes x 1 CPU against here on 2 cores): {100 * (two / local - 1):+.1f}%; "
          f"2 nodes against 1: {one / two:.2f}x")


if __name__ == "__main__":
    main()
