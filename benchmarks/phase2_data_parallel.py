"""Phase 2 data-parallel, a measured prototype (issue #33, docs/scaling.md): does Keras 3 on TensorFlow train
the phase-2 trainee under `tf.distribute.MultiWorkerMirroredStrategy`, and what do steps and gradient
all-reduces cost with 1 and 2 workers?

    .venv/bin/python benchmarks/phase2_data_parallel.py [--steps 40] [--batch 32]

Each worker is a process of its own with one TensorFlow thread (a 1-CPU node), on 127.0.0.1 (TF_CONFIG).
It builds the default recipe's phase-2 model (MobileNetV2 layers from fine_tune_at = 100 on and the head, on
160-px boundary activations, the classifier's own layers as `cut.top_model` makes them) under the strategy,
then times:
- `model.fit` (Keras 3's own loop), which keras-team/keras#20585 reports broken under this strategy;
- a custom step: `strategy.run` of forward, backward and `optimizer.apply_gradients` (gradients all-reduced);
- the all-reduce alone of tensors shaped like the trainable variables.
Random boundary activations: the step's cost does not depend on their values. Medians of the steps after two
warm-up steps; images/s counts every worker's images (the global batch).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(steps: int, batch: int) -> dict:
    """One worker's part; prints its figures as JSON (worker 0's are reported)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from mobiletune.config import load_config
    from mobiletune.model import cut
    from mobiletune.model.network import compile_fresh, create_model

    config = load_config(overrides=[])
    with strategy.scope():
        classifier = create_model(config, 2)
        classifier.set_trainable(2, config)
        model = cut.top_model(classifier, config.phase2.fine_tune_at)
        compile_fresh(model, "rmsprop", 1e-5)
    shapes = model.input_shape if isinstance(model.input_shape, list) else [model.input_shape]  # 1 or 2 boundaries
    rng = tf.random.Generator.from_seed(0)
    x = tuple(rng.normal((batch, *s[1:])) for s in shapes)
    x = x[0] if len(x) == 1 else x  # Keras wants a lone input as a tensor
    y = tf.cast(rng.uniform((batch, 1)) > 0.5, tf.float32)
    figures = {"workers": strategy.num_replicas_in_sync, "trainable_megabytes":
               sum(v.numpy().nbytes for v in model.trainable_variables) / 2**20}
    global_batch = batch * strategy.num_replicas_in_sync

    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(global_batch))
    inputs = iter(dataset)

    @tf.function
    def step(batch_in):
        def replica(data):
            features, labels = data
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x=features, y=labels, y_pred=model(features, training=True))
                scaled = loss / strategy.num_replicas_in_sync
            grads = tape.gradient(scaled, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss
        return strategy.run(replica, args=(batch_in,))

    figures["custom step s"] = _timed(lambda: step(next(inputs)), steps)
    like = [tf.zeros_like(v) for v in model.trainable_variables]

    @tf.function
    def all_reduce():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", like))

    figures["all-reduce s"] = _timed(all_reduce, steps)
    try:
        model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)  # warm-up and tracing
        started = time.perf_counter()
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
        figures["fit step s"] = (time.perf_counter() - started) / steps
    except Exception as exc:  # noqa: BLE001 - what fails is the finding
        figures["fit"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    figures["images/s"] = global_batch / figures["custom step s"]
    return figures


def _timed(run, steps: int) -> float:
    for _ in range(2):
        _block(run())
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        _block(run())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _block(result) -> None:
    import tensorflow as tf

    for t in tf.nest.flatten(result):
        for value in getattr(t, "values", (t,)):
            value.numpy()


def run_workers(count: int, steps: int, batch: int) -> dict:
    ports = [_free_port() for _ in range(count)]
    processes = []
    for index in range(count):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(
            {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen([sys.executable, __file__, "--worker", "--steps", str(steps), "--batch",
                                           str(batch)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    outputs = [p.communicate(timeout=1200) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"a worker failed ({p.returncode}):\n{err[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32, help="images per worker per step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.batch)))
        return
    sys.path.insert(0, str(HERE))
    from scaling import host_line
    from tutorial_vs_mobiletune import gemm_peak_gflops

    print(f"{host_line()}; fp32 GEMM ceiling {gemm_peak_gflops():.0f} GFLOP/s; batch {args.batch} per worker, "
          f"medians of {args.steps} steps", flush=True)
    for count in (1, 2):
        print(f"{count} worker(s): {run_workers(count, args.steps, args.batch)}", flush=True)


if __name__ == "__main__":
    main()
