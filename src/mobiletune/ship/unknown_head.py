""""Unknown" inside the exported graph: the run's unknown-input score as a second output, so a phone or a page
says "unknown" without the run folder.

The score is the run's own (`evaluation.unknown`): for knn the training images' unit-length pooled features
become a constant matrix, and the score is 1 - the cosine similarity to the k-th most similar of them; msp and
energy come from the logits. The threshold travels in the model's metadata (`ship.tflite_metadata`).
"""

from __future__ import annotations

import keras
import numpy as np

from mobiletune.evaluation.unknown import UnknownDetector
from mobiletune.model.network import Classifier
from mobiletune.ship.tflite_metadata import PROBABILITIES, UNKNOWN

__all__ = ["UnknownScore", "shipped_model"]


class UnknownScore(keras.layers.Layer):
    """(pooled features, logits) -> the unknown-input score [n, 1], higher for stranger inputs.

    For knn the reference matrix ends in one anchor column, minus the training images' mean direction: its
    similarity is negative for every input, so it is never among the k nearest (pooled features are non-negative,
    and so are their similarities to the training images), but an int8 model calibrated on training images alone
    then still spans similarities down to about -0.8 and scores up to about 1.8. Without it, every input less
    like the training images than the least typical of them got that one's score, just under the threshold: the
    int8 model kept 65% of flowers that the run calls unknown.
    """

    def __init__(self, score: str, k: int, reference: np.ndarray | None, **kwargs):
        super().__init__(**kwargs)
        self.score, self.k = score, k
        self.reference = None
        if score == "knn":
            self.k, self.n = min(k, len(reference)), len(reference)
            mean = reference.mean(axis=0)
            anchor = -mean / max(float(np.linalg.norm(mean)), 1e-12)
            matrix = np.concatenate([reference, anchor[None]]).T  # [channels, n + 1]: one product, every similarity
            self.reference = self.add_weight(shape=matrix.shape, trainable=False, name="reference",
                                             initializer=keras.initializers.Constant(matrix))

    def call(self, pooled, logits):
        ops = keras.ops
        if self.score == "msp":
            return 1.0 - ops.max(ops.softmax(logits, axis=-1), axis=-1, keepdims=True)
        if self.score == "energy":
            return -ops.logsumexp(logits, axis=-1, keepdims=True)
        import tensorflow as tf  # exports run on TensorFlow

        # one L2_NORMALIZATION op, which has an int8 kernel
        unit = tf.math.l2_normalize(pooled, axis=-1, epsilon=1e-24)
        similarity = ops.matmul(unit, self.reference)
        nearest = ops.top_k(similarity[:, :self.n], self.k)[0]
        distance = 1.0 - ops.concatenate([nearest, similarity[:, self.n:]], axis=-1)  # the anchor keeps its range
        return distance[:, self.k - 1:self.k]


def shipped_model(classifier: Classifier, detector: UnknownDetector | None) -> keras.Model:
    """The serving model (`Classifier.serving_model`) with named outputs: {"probabilities": [n, classes]} and,
    with `detector`, "unknown" [n, 1]: the input is unknown when it is above `detector.threshold`. Binary models'
    logits are the pair (0, z), as the detector scored them."""
    serving = classifier.serving_model(scoring=detector is not None)
    if detector is None:
        return keras.Model(serving.input, {PROBABILITIES: serving.output}, name="mobiletune_serving")
    probabilities, logits, pooled = serving.outputs
    score = UnknownScore(detector.score, detector.k, detector.reference, name=UNKNOWN)(pooled, logits)
    return keras.Model(serving.input, {PROBABILITIES: probabilities, UNKNOWN: score}, name="mobiletune_serving")
