"""Retraining from an earlier run (`mobiletune train DATA --from RUN`), for a folder that grows: the new run
starts from RUN's trained weights on a shorter schedule, keeps RUN's training images in train (`data.parent`;
`data.split.assign_splits`), and records RUN as its parent. The images RUN saw keep their cached features, so
only the new ones pass through the network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mobiletune import runfolder
from mobiletune.config import Config, load_config
from mobiletune.data.manifest import read_manifest
from mobiletune.errors import UsageError

if TYPE_CHECKING:
    from mobiletune.model.network import Classifier

__all__ = ["RETRAIN_SCHEDULE", "check_config", "check_data", "known_probabilities", "retrain_overrides",
           "start_from_parent"]

# The parent's head and fine-tuned layers already fit most of the images: no head-only phase, and one epoch of
# phase 2 at its rate over old and new images. On cats vs dogs +1% (benchmarks/retrain.py, docs/scaling.md) 1, 2
# and 3 epochs tested at 98.0, 97.5 and 97.5% (cold: 96.0%, Wilson 92.3-98.0%) for 18, 22 and 29% of a cold run.
RETRAIN_SCHEDULE = {"phase1.epochs": 0, "phase2.epochs": 1}
# What must match for RUN's weights to fit this run's network: its input size, width and cut
SAME = ("data.image_size", "model.alpha", "phase2.fine_tune_at")
FROM_SCRATCH = "a different model needs training from scratch: drop --from"


def retrain_overrides(run: str | Path) -> dict[str, Any]:
    """What a run from RUN sets on top of its recipe (by default RUN's own config.yaml): the retraining schedule
    and `data.parent`; the caller's --set goes on top of these. Refuses a folder that is no finished run."""
    run = Path(run)
    if not (run / runfolder.METRICS).is_file() or not (run / runfolder.CONFIG).is_file():
        raise UsageError(f"--from {run}: not a finished run folder (no metrics.json or config.yaml); give the folder "
                         "of a run `mobiletune train` completed")
    return {**RETRAIN_SCHEDULE, "data.parent": str(run.resolve())}


def check_config(config: Config) -> None:
    """Refuse, before any image is read, a config whose network the parent's (`config.data.parent`) weights do not
    fit: another input size, width or cut."""
    run = Path(config.data.parent)
    theirs, mine = load_config(run / runfolder.CONFIG).flat(), config.flat()
    for key in SAME:
        if theirs[key] != mine[key]:
            raise UsageError(f"--from {run}: its {key} is {theirs[key]!r}, this run's {mine[key]!r}; {FROM_SCRATCH}")


def check_data(config: Config, classes: list[str], weights_sha256: str) -> None:
    """Refuse, before the feature pass, data of other classes, or base weights other than the parent's."""
    run = Path(config.data.parent)
    metrics = runfolder.read_metrics(run)
    if metrics["classes"] != classes:
        raise UsageError(f"--from {run}: its classes {metrics['classes']} are not this data's {classes}; "
                         f"{FROM_SCRATCH}")
    if metrics.get("environment", {}).get("base_weights_sha256") != weights_sha256:
        raise UsageError(f"--from {run}: it was trained from other base weights (model.weights); {FROM_SCRATCH}")


def start_from_parent(classifier: Classifier, config: Config, say) -> dict[str, Any]:
    """Put the parent run's (`config.data.parent`, checked by `check_config` and `check_data`) trained weights into
    `classifier`. Returns what metrics.json records of the parent."""
    from mobiletune.model.network import Classifier, load_model  # TensorFlow: only once a run starts

    run = Path(config.data.parent)
    parent = Classifier(load_model(run / runfolder.MODEL))
    for part in ("base", "logits"):  # the parts with weights; augmentation and dropout have none to carry
        getattr(classifier, part).set_weights(getattr(parent, part).get_weights())
    accuracy = runfolder.read_metrics(run)["after_fine_tuning"]["test"]["accuracy"]
    say(f"starting from {run}: its weights (test accuracy {accuracy:.2%} on its own test set), "
        f"{config.phase2.epochs} epoch(s) of fine-tuning on this data")
    return {"run": str(run.resolve()), "test_accuracy": accuracy,
            "model_sha256": hashlib.sha256((run / runfolder.MODEL).read_bytes()).hexdigest()}


def known_probabilities(config: Config, hashes: list[str], classes: list[str]) -> np.ndarray:
    """The parent's (`config.data.parent`) final probabilities of the images with these digests, [n, classes], from
    its test_predictions.csv; NaN rows where it did not test that content, or wrote a probability too small to
    keep (older runs rounded to 6 decimals: a 0 would change the loss). A --from run's model "before" is the
    parent's, so on its test images these are what it would compute again (8 of 69 s at 10,000 images)."""
    run = Path(config.data.parent)
    known = np.full((len(hashes), len(classes)), np.nan)
    if not (run / runfolder.PREDICTIONS).is_file() or not (run / runfolder.SPLIT).is_file():
        return known
    digests = {row["path"]: row["sha256"] for row in read_manifest(run / runfolder.SPLIT)}
    tested = {}
    for row in runfolder.read_csv(run / runfolder.PREDICTIONS):
        probs = [float(row.get(f"p_after_{c}") or 0) for c in classes]
        if row["path"] in digests and min(probs) > 0:
            tested[digests[row["path"]]] = probs
    for i, digest in enumerate(hashes):
        known[i] = tested.get(digest, known[i])
    return known
