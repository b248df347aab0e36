"""Cached features to Keras: a tf.data pipeline that reads batches from the store, in an order drawn from
(seed, epoch) alone."""

from __future__ import annotations

import numpy as np

from mobiletune.data import pixels as pixels_lib
from mobiletune.features.store import RowReader

# ---------------------------------------------------------------------------------------------
# Feeding cached features to Keras


def feature_dataset(reader: RowReader, outputs: list[int], labels: np.ndarray, views: int, batch_size: int, *,
                    shuffle: bool, seed: int, initial_epoch: int = 0, epochs: int = 1):
    """A tf.data pipeline of cached features: (float32 features, label) batches, read from the store.

    `reader` holds [views x n] rows (view v of image i at v*n + i); `outputs` are the extractor
    outputs the trainee takes, in its input order. Shuffled: epochs `initial_epoch` .. `epochs - 1`
    back to back, epoch e in an order and with one view per image drawn from (seed, e) alone, so a
    resumed run sees exactly the batches an unbroken one would, whatever the store's layout.
    Batches are read with pread in parallel map calls, a few batches ahead: memory stays flat
    however large the store.
    """
    import tensorflow as tf

    n = len(labels)
    y = tf.constant(labels)
    seed64 = tf.constant(seed, tf.int64)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=tf.stack([seed64, epoch]))
        view = tf.random.stateless_uniform([n], seed=tf.stack([seed64, -1 - epoch]), maxval=views, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((order, view)).batch(batch_size)

    if shuffle:
        batches = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
    else:
        batches = tf.data.Dataset.from_tensor_slices(
            (tf.range(n, dtype=tf.int64), tf.zeros(n, tf.int64))).batch(batch_size)
    def read(rows, view):
        return reader.read(view * n + rows, outputs)

    stored = [tf.as_dtype(reader.dtypes[k]) for k in outputs]

    def load(rows, view):
        xs = tf.numpy_function(read, [rows, view], stored, stateful=False)
        # float16 activations widen here, in the tf.data graph: 7x faster than NumPy's astype, which cost
        # ~8% of a 2-core phase-2 epoch. Cast first: any other op on a float16 tensor (ensure_shape
        # included) makes oneDNN log "supports DT_HALF only on ..." to the console
        xs = tuple(tf.ensure_shape(tf.cast(x, tf.float32), [None, *reader.shapes[k]])
                   for x, k in zip(xs, outputs, strict=True))
        return (xs if len(xs) > 1 else xs[0]), tf.gather(y, rows)

    return pixels_lib.prefetched(batches, load)
