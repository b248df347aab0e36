"""Which unknown-input score: each score's separation of images from another data set.

    .venv/bin/python benchmarks/unknown_inputs.py [--set KEY=VALUE ...] [--k 1 5 10 20]

Trains the default recipe on each of cats_and_dogs_filtered and flowers_mini (../shared/data),
then, for each model, scores its own test images (in distribution) and every image of the other
data set (unknown) with every score (`mobiletune.evaluation.unknown`), all from pixels through the saved
model as `mobiletune predict` sees them. Per score: AUROC (unknown against test), and at the
threshold that keeps `predict.keep` of the validation images, the share of test images kept and
of unknown images accepted; last, the detector the run itself stored (fitted on its cached
features, training images' view 0). --set overrides go to both runs (e.g. phase1.lr=1e-3).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE))
from scaling import host_line  # noqa: E402

PAIRS = (("cats_and_dogs_filtered", "flowers_mini"), ("flowers_mini", "cats_and_dogs_filtered"))


def pixel_embeddings(classifier, images, split: str | None, config):
    """(pooled, logits) of `split`'s images (every image for None) from pixels, unaugmented."""
    import keras
    import numpy as np

    from mobiletune.data import pixels

    two = keras.Model(classifier.model.input, [classifier.pool.output, classifier.model.output])
    positions = np.arange(len(images.paths)) if split is None else images.indices(split)
    pooled, logits = [], []
    for _, x, failed in pixels.iter_pixels(images, positions, config.data.image_size, config.data.batch_size):
        assert not failed, failed
        p, z = two.predict_on_batch(x.astype("float32"))
        pooled.append(np.asarray(p))
        logits.append(np.asarray(z))
    return np.concatenate(pooled), np.concatenate(logits)


def evaluate_pair(run: Path, known: str, unknown_dir: str, ks: list[int]) -> list[dict]:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from mobiletune import runfolder
    from mobiletune.config import load_config
    from mobiletune.data import folders as data
    from mobiletune.evaluation import unknown
    from mobiletune.model.network import Classifier, load_model

    config = load_config(run / "config.yaml")
    model = Classifier(load_model(run / "model.keras"))
    images = data.load_images(SHARED / known, config.data)
    other = data.load_images(SHARED / unknown_dir, config.data)
    emb = {s: pixel_embeddings(model, images, s, config) for s in ("train", "validation", "test")}
    strange = pixel_embeddings(model, other, None, config)
    rows = []
    fitted = [(name if name != "knn" else f"knn k={k}",
               unknown.fit(name, emb["train"][0], *emb["validation"], keep=config.predict.keep, k=k or 1))
              for name, k in [("msp", 0), ("energy", 0), *[("knn", k) for k in ks]]]
    own = unknown.load(run / runfolder.UNKNOWN)  # fitted by the run on its cached features: what users get
    fitted.append((f"the run's own ({own.score} k={own.k})", own))
    for name, detector in fitted:
        test, odd = detector.scores(*emb["test"]), detector.scores(*strange)
        auroc = roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(odd))], np.r_[test, odd])
        rows.append({"known": known, "score": name, "auroc": auroc,
                     "val_kept": detector.validation_kept, "test_kept": float(np.mean(test <= detector.threshold)),
                     "unknown_accepted": float(np.mean(odd <= detector.threshold)), "n_test": len(test),
                     "n_unknown": len(odd)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20], help="knn neighbours to compare")
    args = parser.parse_args()

    from mobiletune.config import load_config
    from mobiletune.training.run import train_and_evaluate

    print(host_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mt-unknown-") as tmp:
        for known, other in PAIRS:
            run = Path(tmp) / known
            started = time.perf_counter()
            config = load_config(overrides=args.overrides)
            metrics = train_and_evaluate(config, SHARED / known, run).metrics
            after = metrics["after_fine_tuning"]["test"]["accuracy"]
            print(f"{known}: trained in {time.perf_counter() - started:.0f} s, test accuracy after {after:.1%}; "
                  f"as the run chose: {metrics['unknown']}", flush=True)
            rows += evaluate_pair(run, known, other, args.k)
    print("\n| model trained on | score | AUROC | validation kept | test kept | unknown accepted |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['known']} | {r['score']} | {r['auroc']:.3f} | {r['val_kept']:.1%} | {r['test_kept']:.1%} "
              f"({r['n_test']}) | {r['unknown_accepted']:.1%} ({r['n_unknown']}) |")


if __name__ == "__main__":
    main()
