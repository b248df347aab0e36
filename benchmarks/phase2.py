"""Phase 2 against the hardware: a fine-tuning epoch's FLOPs, its time, and where the time goes.

    .venv/bin/python benchmarks/phase2.py [DATA_DIR] [--rounds 5] [--profile] [--kernels]
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/phase2.py ...   # oneDNN limited to AVX2

One process: measures the fp32 GEMM ceiling (best 4096x4096 `tf.linalg.matmul`), computes the
default recipe's features (the cache makes that free after the first time), then trains phase-2
epochs on them exactly as `mobiletune train` does (the default config: fine_tune_at 100,
batch 32, RMSprop, validation every epoch), alternating the trainee as it ships (1x1
convolutions as matrix products, `mobiletune.model.kernels`) with the plain Keras layers, one epoch
each per round, and prints each one's median epoch and its share of the ceiling.

FLOPs, as issue #12 counts them: the forward FLOPs of the convolutions from `fine_tune_at` on,
counted from the model's own layers, 3x per training image (forward, input and weight
gradients) plus 1x per validation image.

--profile: one more epoch of each under TensorFlow's profiler; prints kernel time per op type
and what the tf.data threads did. --kernels: the 1x1 convolutions of MobileNetV2's top alone,
as Conv2D and as MatMul, forward plus both gradients.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cats_and_dogs_filtered"
sys.path.insert(0, str(HERE))
from scaling import host_line  # noqa: E402
from tutorial_vs_mobiletune import gemm_peak_gflops  # noqa: E402


def forward_gflop(base, fine_tune_at: int) -> float:
    """Forward GFLOP per image of the convolutions at and above `fine_tune_at` (2 per multiply-add)."""
    import keras

    total = 0
    for layer in base.layers[fine_tune_at:]:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            h, w, c = layer.output.shape[1:]
            total += 2 * h * w * c * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, keras.layers.Conv2D):
            h, w, c = layer.output.shape[1:]
            total += 2 * h * w * c * layer.input.shape[-1] * layer.kernel_size[0] * layer.kernel_size[1]
    return total / 1e9


def prepare(data_dir: str):
    """The default recipe's model after phase 1's setup, its phase-2 datasets and its counts."""
    from mobiletune.config import load_config
    from mobiletune.data import folders as data
    from mobiletune.data import scan
    from mobiletune.features import compute as features
    from mobiletune.features import dataset
    from mobiletune.model.network import create_model
    from mobiletune.training import loop as training

    config = load_config(overrides=[])
    images = data.load_images(data_dir, config.data, scan.FileIndex(None))
    training.seed_everything(config.data.seed)  # as a run does
    model = create_model(config, len(images.classes))
    feats = features.compute_features(model, images, config)
    model.set_trainable(2, config)
    images, cut = feats.images, feats.boundaries[config.phase2.fine_tune_at]
    labels = {s: images.labels[images.indices(s)] for s in ("train", "validation")}
    batch, seed = config.data.batch_size, config.data.seed
    train_data = dataset.feature_dataset(feats.readers["train"], cut, labels["train"], feats.views["train"], batch,
                                          shuffle=True, seed=seed, epochs=1000)
    val_data = dataset.feature_dataset(feats.readers["validation"], cut, labels["validation"], 1, batch,
                                        shuffle=False, seed=seed)
    counts = {s: len(v) for s, v in labels.items()}
    return model, config, train_data, val_data, counts


def trainees(model, config) -> dict:
    """The trainee as shipped and with Keras' own 1x1 convolutions, each compiled as train_phase does."""
    from mobiletune.model import cut
    from mobiletune.model import network as model_lib

    out = {}
    for name, fast in (("fast kernels (shipped)", True), ("Keras layers", False)):
        trainee = cut.top_model(model, config.phase2.fine_tune_at, fast=fast)
        loss, metric = model_lib.loss_and_metric(model.binary)
        trainee.compile(optimizer=model_lib.make_optimizer(config.phase2.optimizer, 1e-5), loss=loss,
                        metrics=[metric])
        out[name] = trainee
    return out


def epoch(trainee, train_data, val_data, steps: int) -> float:
    started = time.perf_counter()
    trainee.fit(train_data, validation_data=val_data, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - started


def profile_epoch(trainee, train_data, val_data, steps: int) -> None:
    """One epoch under the profiler; kernel time per op type, and the tf.data threads' busy time."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        wall = epoch(trainee, train_data, val_data, steps)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1]).read_bytes())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    kernels, counts, pipeline = collections.Counter(), collections.Counter(), 0.0
    for line in plane.lines:
        for event in line.events:
            name, seconds = plane.event_metadata[event.metadata_id].name, event.duration_ps / 1e12
            if line.name.startswith("tf_Compute") and "/" in name and ":" in name:  # "graph/op/name:OpType"
                kernels[name.rsplit(":", 1)[1]] += seconds
                counts[name.rsplit(":", 1)[1]] += 1
            elif line.name.startswith("tf_data_private_threadpool") and name.startswith("PyFunc"):
                pipeline += seconds
    total = sum(kernels.values())
    print(f"  profiled epoch {wall:.2f} s (the profiler adds time); kernel time {total:.2f} s on 2 executor threads; "
          f"tf.data reading batches {pipeline:.2f} s")
    for op, seconds in kernels.most_common(12):
        print(f"  {seconds:7.3f} s {seconds / total:6.1%} {counts[op]:6d} calls  {op}")


def kernels() -> None:
    """MobileNetV2's top 1x1 convolutions at 160 px, batch 32: Conv2D vs MatMul, forward + both gradients."""
    import numpy as np
    import tensorflow as tf

    def conv(x, w):
        return tf.nn.conv2d(x, w[None, None], 1, "VALID")

    def matmul(x, w):
        return tf.reshape(tf.reshape(x, [-1, x.shape[-1]]) @ w, [-1, *x.shape[1:3], w.shape[1]])

    def timed(f, x, w, dy):
        step = tf.function(lambda x, w, dy: tf.gradients(f(x, w), [x, w], grad_ys=dy))
        step(x, w, dy)
        times = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(20):
                out = step(x, w, dy)
            out[0].numpy()
            times.append((time.perf_counter() - started) / 20)
        return float(np.median(times)), out

    print("1x1 convolution (batch 32), forward + input and weight gradients: Conv2D vs MatMul")
    for size, cin, cout in ((10, 576, 96), (10, 96, 576), (5, 960, 160), (5, 160, 960), (5, 320, 1280)):
        x, w = tf.random.normal([32, size, size, cin]), tf.random.normal([cin, cout])
        dy = tf.random.normal([32, size, size, cout])
        gflop = 3 * 2 * 32 * size * size * cin * cout / 1e9
        (t_conv, a), (t_mm, b) = timed(conv, x, w, dy), timed(matmul, x, w, dy)
        diff = max(float(tf.reduce_max(tf.abs(p - q)) / tf.reduce_max(tf.abs(p))) for p, q in zip(a, b, strict=True))
        print(f"  {size}x{size} {cin:4d}->{cout:4d}: Conv2D {t_conv * 1e3:5.2f} ms ({gflop / t_conv:4.0f} GFLOP/s), "
              f"MatMul {t_mm * 1e3:5.2f} ms ({gflop / t_mm:4.0f} GFLOP/s), {t_conv / t_mm:.2f}x; "
              f"largest difference {diff:.1e} of the largest value")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs of each trainee, alternating")
    parser.add_argument("--profile", action="store_true", help="one more epoch of each under the profiler")
    parser.add_argument("--kernels", action="store_true", help="also time the 1x1 convolutions alone")
    args = parser.parse_args()

    print(f"{host_line()}; ", end="", flush=True)
    peak = gemm_peak_gflops()
    print(f"fp32 GEMM ceiling {peak:.0f} GFLOP/s (best 4096x4096 tf.linalg.matmul)")
    if args.kernels:
        kernels()
    model, config, train_data, val_data, counts = prepare(args.data_dir)
    per_image = forward_gflop(model.base, config.phase2.fine_tune_at)
    gflop = 3 * per_image * counts["train"] + per_image * counts["validation"]
    print(f"phase 2 from layer {config.phase2.fine_tune_at}: {per_image:.4f} GFLOP per image forward; an epoch of "
          f"{counts['train']} training + {counts['validation']} validation images = {gflop:.0f} GFLOP")
    steps = -(-counts["train"] // config.data.batch_size)
    runs = trainees(model, config)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for trainee in runs.values():
        epoch(trainee, train_data, val_data, steps)  # tracing and first-touch: not timed
    for _ in range(args.rounds):
        for name, trainee in runs.items():
            times[name].append(epoch(trainee, train_data, val_data, steps))
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:22s} epoch median {median:.2f} s (of {', '.join(f'{s:.2f}' for s in seconds)}): "
              f"{gflop / median:.0f} GFLOP/s = {gflop / median / peak:.0%} of the ceiling")
    first, second = times.values()
    print(f"ratio {statistics.median(second) / statistics.median(first):.2f}x")
    if args.profile:
        for name, trainee in runs.items():
            print(f"profile, {name}:")
            profile_epoch(trainee, train_data, val_data, steps)


if __name__ == "__main__":
    main()
