""""Unknown" inside the exported graph: the run's unknown-input score as a second output, so a phone or a page
says "unknown" without the run folder.

The score is the run's own (`evaluation.unknown`): for knn the training images' unit-length features of each
view become a constant matrix, each view's distance is 1 - the cosine similarity to the k-th most similar of them
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
    """(the detector's features, logits) -> the unknown-input score [n, 1], higher for stranger inputs.

    For knn, each view's reference matrix ends in one anchor column, minus the training images' mean direction:
    its similarity is negative for every input, so it is never among the k nearest (the views' features are
    non-negative, and so are their similarities to the training images), but an int8 model calibrated on training
    images alone then still spans similarities down to about -0.8 and scores up to about 1.8. Without it, every
    input less like the training images than the least typical of them got that one's score, just under the
    threshold: the int8 model kept 65% of flowers that the run calls unknown. With several views, each distance
    is put in the detector's robust deviations and the score is the largest, as `UnknownDetector.scores`.
    """

    def __init__(self, detector: UnknownDetector, **kwargs):
        super().__init__(**kwargs)
        self.score, self.k = detector.score, detector.k
        self.matrices, self.edges = [], []
        if self.score != "knn":
            return
        self.n, self.k = len(detector.reference), min(detector.k, len(detector.reference))
        self.deviations = list(zip(detector.centre, detector.spread, strict=True)) or [(0.0, 1.0)]
        parts = unknown.split_views(detector.reference, detector.widths)
        self.edges = np.cumsum([0, *(p.shape[1] for p in parts)]).tolist()
        for i, reference in enumerate(parts):
            mean = reference.mean(axis=0)
            anchor = -mean / max(float(np.linalg.norm(mean)), 1e-12)
            matrix = np.concatenate([reference, anchor[None]]).T  # [channels, n + 1]: one product, every similarity
            self.matrices.append(self.add_weight(shape=matrix.shape, trainable=False, name=f"reference_{i}",
                                                 initializer=keras.initializers.Constant(matrix)))

    def call(self, features, logits):
        ops = keras.ops
        if self.score == "msp":
            return 1.0 - ops.max(ops.softmax(logits, axis=-1), axis=-1, keepdims=True)
        if self.score == "energy":
            return -ops.logsumexp(logits, axis=-1, keepdims=True)
        import tensorflow as tf  # exports run on TensorFlow

        scores = []
        for matrix, a, b, (centre, spread) in zip(self.matrices, self.edges[:-1], self.edges[1:], self.deviations,
                                                  strict=True):
            # one L2_NORMALIZATION op, which has an int8 kernel
            unit = tf.math.l2_normalize(features[:, a:b], axis=-1, epsilon=1e-24)
            similarity = ops.matmul(unit, matrix)
            nearest = ops.top_k(similarity[:, :self.n], self.k)[0]
            distance = 1.0 - ops.concatenate([nearest, similarity[:, self.n:]], axis=-1)  # the anchor keeps its range
            score = distance[:, self.k - 1:self.k]
            scores.append(score if (centre, spread) == (0.0, 1.0) else (score - centre) / spread)
        return scores[0] if len(scores) == 1 else ops.max(ops.concatenate(scores, axis=-1), axis=-1, keepdims=True)


def shipped_model(classifier: Classifier, detector: UnknownDetector | None) -> keras.Model:
    """The serving model (`Classifier.serving_model`) with named outputs: {"probabilities": [n, classes]} and,
    with `detector`, "unknown" [n, 1]: the input is unknown when it is above `detector.threshold`. Binary models'
    logits are the pair (0, z), as the detector scored them."""
    serving = classifier.serving_model(scoring=detector is not None, views=detector.views if detector else ())
    if detector is None:
        return keras.Model(serving.input, {PROBABILITIES: serving.output}, name="mobiletune_serving")
    probabilities, logits, features = serving.outputs
    score = UnknownScore(detector, name=UNKNOWN)(features, logits)
    return keras.Model(serving.input, {PROBABILITIES: probabilities, UNKNOWN: score}, name="mobiletune_serving")
