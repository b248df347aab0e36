""""Unknown" inside the exported graph: the run's unknown-input score as a second output, so a phone or a page
says "unknown" without the run folder.

The score is the run's own (`evaluation.unknown`): for knn the training images' unit-length features of each
layer become a constant matrix, each layer's distance is 1 - the cosine similarity to the k-th most similar of them
in the detector's robust deviations, and the score is the largest; msp and energy come from the logits. The
threshold travels in the model's metadata (`ship.tflite_metadata`).
"""

from __future__ import annotations

import keras
import numpy as np

from mobiletune.evaluation import unknown
from mobiletune.evaluation.unknown import UnknownDetector
from mobiletune.model.network import Classifier
from mobiletune.ship.tflite_metadata import PROBABILITIES, UNKNOWN

__all__ = ["UnknownScore", "shipped_model"]


class UnknownScore(keras.layers.Layer):
    """(the parts of the detector's features, one per layer it reads; logits) -> the unknown-input score [n, 1],
    higher for stranger inputs.

    For knn, each layer's reference matrix ends in one anchor column, minus the training images' mean direction:
    its similarity is negative for every input, so it is never among the k nearest (the layers' features are
    non-negative, and so are their similarities to the training images), but an int8 model calibrated on training
    images alone then still spans similarities down to about -0.8 and scores up to about 1.8. Without it, every
    input less like the training images than the least typical of them got that one's score, just under the
    threshold: the int8 model kept 65% of flowers that the run calls unknown. With several layers, each matrix is
    divided by its layer's spread, so the product's tensor, anchor included, is already in the detector's robust
    deviations: an affine op after it would have its int8 range calibrated on training images alone and clamp
    every stranger input to the least typical training image's score. The score is the largest, as
    `UnknownDetector.scores`.
    """

    def __init__(self, detector: UnknownDetector, **kwargs):
        super().__init__(**kwargs)
        self.score, self.k = detector.score, detector.k
        self.matrices, self.offsets = [], []
        if self.score != "knn":
            return
        self.n, self.k = len(detector.reference), min(detector.k, len(detector.reference))
        scales = list(zip(detector.centre, detector.spread, strict=True)) or [(0.0, 1.0)]  # one layer: raw distances
        parts = unknown.split_layers(detector.reference, detector.widths)
        for i, (reference, (centre, spread)) in enumerate(zip(parts, scales, strict=True)):
            mean = reference.mean(axis=0)
            anchor = -mean / max(float(np.linalg.norm(mean)), 1e-12)
            matrix = np.concatenate([reference, anchor[None]]).T / spread  # [channels, n + 1]: every similarity
            self.matrices.append(self.add_weight(shape=matrix.shape, trainable=False, name=f"reference_{i}",
                                                 initializer=keras.initializers.Constant(matrix)))
            self.offsets.append((1.0 - centre) / spread)

    def call(self, parts, logits):
        ops = keras.ops
        if self.score == "msp":
            return 1.0 - ops.max(ops.softmax(logits, axis=-1), axis=-1, keepdims=True)
        if self.score == "energy":
            return -ops.logsumexp(logits, axis=-1, keepdims=True)
        import tensorflow as tf  # exports run on TensorFlow

        per_layer = []
        for part, matrix, offset in zip(parts, self.matrices, self.offsets, strict=True):
            # one L2_NORMALIZATION op, which has an int8 kernel
            unit = tf.math.l2_normalize(part, axis=-1, epsilon=1e-24)
            similarity = ops.matmul(unit, matrix)  # cosine / spread
            nearest = ops.top_k(similarity[:, :self.n], self.k)[0]
            # (1 - cosine - centre) / spread for the k nearest, then the anchor, which keeps the range
            per_layer.append(offset - ops.concatenate([nearest, similarity[:, self.n:]], axis=-1))
        if len(per_layer) == 1:
            return per_layer[0][:, self.k - 1:self.k]
        every = ops.concatenate(per_layer, axis=-1)  # every layer's anchor in one tensor: its range spans them
        kth = ops.take(every, [i * (self.k + 1) + self.k - 1 for i in range(len(per_layer))], axis=1)
        return ops.max(kth, axis=-1, keepdims=True)


def shipped_model(classifier: Classifier, detector: UnknownDetector | None) -> keras.Model:
    """The serving model (`Classifier.serving_model`) with named outputs: {"probabilities": [n, classes]} and,
    with `detector`, "unknown" [n, 1]: the input is unknown when it is above `detector.threshold`. Binary models'
    logits are the pair (0, z), as the detector scored them."""
    if detector is None:
        serving = classifier.serving_model()
        return keras.Model(serving.input, {PROBABILITIES: serving.output}, name="mobiletune_serving")
    serving = classifier.serving_model(scoring=True, layers=detector.layers, apart=True)
    probabilities, logits, *parts = serving.outputs
    score = UnknownScore(detector, name=UNKNOWN)(parts, logits)
    return keras.Model(serving.input, {PROBABILITIES: probabilities, UNKNOWN: score}, name="mobiletune_serving")
