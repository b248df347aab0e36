"""The private internals of other libraries that mobiletune relies on, each where no public API does the job.

They live here alone, so a release that moves one breaks this module and nothing else; the tests that check
each against the public behaviour it stands in for are named with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def rotation_matrix(layer, angles, height, width):
    """`keras.layers.RandomRotation`'s own affine matrices for the given angles (one per image), instead of
    its batch-wide random draw: the feature cache applies each image's own angle (`augment.ViewAugmenter`).
    Keras offers the geometry only through the private `_compute_affine_matrix`
    (tests/test_model.py: the views equal the layer's own at the same angles)."""
    import tensorflow as tf

    zeros = tf.zeros_like(angles)
    return layer._compute_affine_matrix(  # noqa: SLF001 - see the docstring
        center_x=0.5, center_y=0.5, angle=angles, translate_x=zeros, translate_y=zeros, scale=tf.ones_like(angles),
        shear_x=zeros, shear_y=zeros, height=height, width=width)


def patch_tf2onnx() -> None:
    """Keras' NumPy 2 fixes for tf2onnx, as its own ONNX export applies them; public only inside
    `model.export(format="onnx")`, whose resource tracking the fast export skips (tests/test_features.py: the
    fast export equals Keras' own)."""
    from keras.src.export.tf2onnx_lib import patch_tf2onnx as keras_patch

    keras_patch()


@contextlib.contextmanager
def tf2onnx_passes_uncopied() -> Iterator[None]:
    """tf2onnx's optimizer passes run on the graph itself, not each on a deep copy (`catch_errors=False`).
    tf2onnx offers that only through an environment variable, and setting one from a running process would
    race with TensorFlow's threads reading the environment (tests/test_features.py: tf2onnx is as it was
    after the export, and a failing pass falls back to Keras' export)."""
    from tf2onnx import optimizer

    careful = optimizer.optimize_graph
    optimizer.optimize_graph = lambda graph, catch_errors=True, optimizers=None: careful(graph, False, optimizers)
    try:
        yield
    finally:
        optimizer.optimize_graph = careful
