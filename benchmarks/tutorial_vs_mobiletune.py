"""Side by side, in one invocation: the recipe as the TensorFlow tutorial writes it vs `mobiletune train`.

    .venv/bin/python benchmarks/tutorial_vs_mobiletune.py [DATA_DIR] [--seeds 0 1 2] [--quick]
        [--also-set features.views=4 ...]

Both arms use the same train/validation/test files (mobiletune's seeded split; the tutorial's own
take()/skip() on a reshuffled dataset would leak validation images into test). Each arm runs in
its own process so its peak RSS is its own. mobiletune runs twice: with a cold feature cache
and again with the cache warm. Prints wall time, peak RSS, test accuracy/loss before and after
fine-tuning, per-phase images/s against the measured fp32 GEMM ceiling, and the ratio. Each
--also-set KEY=VALUE adds one more cold mobiletune arm with that config override, to measure what
one setting buys in the same run.

With several --seeds, each seed gets its own split and training seed, shared by both arms, and
the summary gives median wall times, their ratio, and mean test accuracies: on a 200-image test
set one seed's accuracy moves by a point or two from the seed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobiletune.data.manifest import read_manifest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cats_and_dogs_filtered"
GFLOP_FORWARD = 0.306  # MobileNetV2 forward at 160 px, per image
GFLOP_PHASE2_STEP = 0.56  # forward + backward through the layers from fine_tune_at = 100


def gemm_peak_gflops() -> float:
    """Best of several fp32 4096x4096 matmuls in TensorFlow: this machine's ceiling."""
    import tensorflow as tf

    a = tf.random.normal((4096, 4096))
    b = tf.random.normal((4096, 4096))
    tf.linalg.matmul(a, b).numpy()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = max(best, 2 * 4096**3 / (time.perf_counter() - t) / 1e9)
    return best


def link_split(data_dir: Path, manifest: list[dict], workdir: Path) -> dict[str, Path]:
    """Symlink trees holding exactly mobiletune's train/validation/test files, for the tutorial."""
    roots = {}
    for row in manifest:
        dst = workdir / row["split"] / row["class"] / Path(row["path"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to((data_dir / row["path"]).resolve())
        roots[row["split"]] = workdir / row["split"]
    return roots


def tutorial_arm(roots: dict[str, str], epochs: tuple[int, int], seed: int) -> dict:
    """The seed's recipe written as the TF transfer-learning tutorial writes it."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    size, batch = (160, 160), 32
    started = time.perf_counter()
    load = lambda d, shuffle: tf.keras.utils.image_dataset_from_directory(  # noqa: E731
        d, shuffle=shuffle, batch_size=batch, image_size=size, seed=seed)
    train_dataset = load(roots["train"], True).prefetch(tf.data.AUTOTUNE)
    validation_dataset = load(roots["validation"], True).prefetch(tf.data.AUTOTUNE)
    test_dataset = load(roots["test"], False).prefetch(tf.data.AUTOTUNE)

    data_augmentation = tf.keras.Sequential(
        [tf.keras.layers.RandomFlip("horizontal"), tf.keras.layers.RandomRotation(0.2)])
    preprocess_input = tf.keras.layers.Rescaling(1 / 127.5, offset=-1)  # = mobilenet_v2.preprocess_input
    base_model = tf.keras.applications.MobileNetV2(input_shape=size + (3,), include_top=False, weights="imagenet")
    base_model.trainable = False
    inputs = tf.keras.Input(shape=size + (3,))
    x = data_augmentation(inputs)
    x = preprocess_input(x)
    x = base_model(x, training=False)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dropout(0.2)(x)
    outputs = tf.keras.layers.Dense(1)(x)
    model = tf.keras.Model(inputs, outputs)

    base_learning_rate = 0.0001
    model.compile(optimizer=tf.keras.optimizers.RMSprop(learning_rate=base_learning_rate),
                  loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0, name="accuracy")])
    t0 = time.perf_counter()
    history = model.fit(train_dataset, epochs=epochs[0], validation_data=validation_dataset, verbose=0)
    t1 = time.perf_counter()
    before = model.evaluate(test_dataset, verbose=0)

    base_model.trainable = True
    fine_tune_at = 100
    for layer in base_model.layers[:fine_tune_at]:
        layer.trainable = False
    for layer in base_model.layers:  # the one fix the tutorial needs in Keras 3: BN stays in inference mode
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.trainable = False
    model.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                  optimizer=tf.keras.optimizers.RMSprop(learning_rate=base_learning_rate / 10),
                  metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0, name="accuracy")])
    t2 = time.perf_counter()
    model.fit(train_dataset, epochs=sum(epochs), initial_epoch=history.epoch[-1] + 1,
              validation_data=validation_dataset, verbose=0)
    t3 = time.perf_counter()
    after = model.evaluate(test_dataset, verbose=0)
    return {"before": {"loss": before[0], "accuracy": before[1]}, "after": {"loss": after[0], "accuracy": after[1]},
            "seconds": {"phase1": t1 - t0, "phase2": t3 - t2, "total": time.perf_counter() - started}}


def mobiletune_arm(data_dir: str, out: str, cache: str, epochs: tuple[int, int], also: list[str], seed: int) -> dict:
    from mobiletune.config import load_config
    from mobiletune.training.run import train_and_evaluate

    config = load_config(overrides=[f"features.cache_dir={cache}", f"phase1.epochs={epochs[0]}",
                                    f"phase2.epochs={epochs[1]}", f"data.seed={seed}", *also])
    started = time.perf_counter()
    m = train_and_evaluate(config, data_dir, out, overwrite=True).metrics
    seconds = dict(m["seconds"], total=time.perf_counter() - started)
    return {"before": m["before_fine_tuning"]["test"], "after": m["after_fine_tuning"]["test"], "seconds": seconds}


def run_arm(args: list[str]) -> dict:
    """One arm in a fresh process; its result is the last line it prints, as JSON."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"arm {args[:2]} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - t
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--quick", action="store_true", help="2 + 2 epochs instead of 10 + 10")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one split and training seed per value, shared by both arms")
    parser.add_argument("--also-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="one more cold mobiletune arm per override, e.g. features.views=4")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = (2, 2) if args.quick else (10, 10)

    if args.arm:  # child process
        payload = json.loads(args.payload)
        result = tutorial_arm(payload["roots"], epochs, payload["seed"]) if args.arm == "tutorial" else \
            mobiletune_arm(args.data_dir, payload["out"], payload["cache"], epochs, payload["also"], payload["seed"])
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    from mobiletune.config import DataConfig
    from mobiletune.data import folders as data
    from mobiletune.data import manifest

    peak = gemm_peak_gflops()
    flag = ["--quick"] if args.quick else []
    runs: list[dict] = []  # one row per (seed, arm)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
            tmp = Path(tmp)
            images = data.load_images(args.data_dir, DataConfig(seed=seed))
            manifest.write_manifest(images, tmp / "split.csv")
            roots = link_split(Path(args.data_dir), read_manifest(tmp / "split.csv"), tmp / "links")
            arm = lambda kind, payload, seed=seed: run_arm(  # noqa: E731
                ["--arm", kind, args.data_dir, *flag, "--payload", json.dumps({**payload, "seed": seed})])
            runs.append({"name": "tutorial-style", "seed": seed,
                         **arm("tutorial", {"roots": {k: str(v) for k, v in roots.items()}})})
            arms = [("mobiletune, cold cache", "cache", []), ("mobiletune, warm cache", "cache", [])]
            arms += [(f"mobiletune, {item}, cold cache", f"cache-{i}", [item]) for i, item in enumerate(args.also_set)]
            for name, cache, also in arms:
                runs.append({"name": name, "seed": seed, **arm(
                    "mobiletune", {"out": str(tmp / "run"), "cache": str(tmp / cache), "also": also})})
            print(f"seed {seed}: " + "; ".join(f"{r['name']} {r['wall']:.0f} s, after "
                                               f"{r['after']['accuracy']:.2%}" for r in runs if r["seed"] == seed),
                  flush=True)
    report(runs, images.counts(), epochs, peak)


def report(runs: list[dict], counts: dict, epochs: tuple[int, int], peak: float) -> None:
    n_train, n_val = counts["train"], counts["validation"]
    from scaling import host_line  # benchmarks/ is on sys.path when this runs as a script

    print(f"\n{host_line()}; fp32 GEMM ceiling: {peak:.0f} GFLOP/s; "
          f"images: {counts}; epochs {epochs[0]} + {epochs[1]}\n")
    print("| run | seed | wall s | peak RSS MB | test acc before | loss before | test acc after | loss after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['name']} | {r['seed']} | {r['wall']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['before']['accuracy']:.2%} | {r['before']['loss']:.4f} | {r['after']['accuracy']:.2%} | "
              f"{r['after']['loss']:.4f} |")

    # The tutorial's per-epoch work: every training image forward (phase 1) or forward+backward
    # through the top (phase 2), and every validation image forward.
    work1 = epochs[0] * (n_train + n_val) * GFLOP_FORWARD
    work2 = epochs[1] * (n_train * GFLOP_PHASE2_STEP + n_val * GFLOP_FORWARD)
    print("\nper phase: images/s (training images per second of phase time) and the tutorial's FLOPs over that "
          "time as a share of the ceiling ('effective': work mobiletune skipped counts as done)")
    for r in runs:
        s = r["seconds"]
        p1 = s["phase1"] + s.get("features", 0.0)  # mobiletune's phase 1 includes making its features
        line = (f"  {r['name']} (seed {r['seed']}): phase 1 {epochs[0] * n_train / p1:.0f} img/s "
                f"({work1 / p1 / peak:.0%} of ceiling), "
                f"phase 2 {epochs[1] * n_train / s['phase2']:.0f} img/s ({work2 / s['phase2'] / peak:.0%})")
        if "features" in s:
            line += (f"; time: load {s['load_images']:.0f} s, features {s['features']:.0f} s, "
                     f"phase 1 {s['phase1']:.0f} s, phase 2 {s['phase2']:.0f} s")
        print(line)

    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(r["name"], []).append(r)
    tutorial = by_arm["tutorial-style"]
    print(f"\nover {len(tutorial)} seed(s): median wall, mean (min-max) test accuracy")
    print("| run | median wall s | ratio to tutorial | before | after | after, paired gap to tutorial |")
    print("|---|---|---|---|---|---|")
    t_wall = statistics.median(r["wall"] for r in tutorial)
    for name, rows in by_arm.items():
        wall = statistics.median(r["wall"] for r in rows)
        gaps = [100 * (r["after"]["accuracy"] - t["after"]["accuracy"]) for r, t in zip(rows, tutorial, strict=True)]
        print(f"| {name} | {wall:.0f} | {t_wall / wall:.2f}x | {_spread(rows, 'before')} | {_spread(rows, 'after')} | "
              f"{round(statistics.mean(gaps), 2) + 0.0:+.2f} points |")  # + 0.0 turns -0.0 into 0.0


def _spread(rows: list[dict], stage: str) -> str:
    acc = [r[stage]["accuracy"] for r in rows]
    return f"{statistics.mean(acc):.2%} ({min(acc):.1%}-{max(acc):.1%})"


if __name__ == "__main__":
    main()
