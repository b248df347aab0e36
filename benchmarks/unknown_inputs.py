"""Unknown inputs, measured: does each model flag the other data set and synthetic images, and keep its own?

    .venv/bin/python benchmarks/unknown_inputs.py [--root /tmp/uk] [--sizes 20 60 200 1000] [--px 96 160 224]
        [--known cats_dogs flowers] [--near daisy roses] [--set KEY=VALUE ...]

Builds the sets (benchmarks/unknown_sets.py: N training images a class, fixed test images), then for each
known set, size and image size trains the default recipe (`train_and_evaluate`, what `mobiletune train` runs;
--set overrides, e.g. phase2.epochs=2 for the 1000-a-class cells, are printed with the table) and scores from
pixels with the library's predictor, as `mobiletune predict RUN` does: the model's own test images (kept),
every image of the other set and 90 synthetic images (flat colours, text screenshots, noise; flagged), with
the detector refitted on the run's images with one layer (the pooled base output) and with two (block 14's
beside it); a run stores the second where its base's last map is 3x3 or smaller (96 px and below). Near-OOD:
trained on flowers_mini without one class (at the second --px), AUROC of that class against the test images.
Cats-vs-dogs models are also scored on 400 further unseen cats and dogs ("further kept").
Prints the host first (counts, not speeds, are the result).
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
sys.path.insert(0, str(HERE))
import unknown_sets  # noqa: E402
from scaling import host_line  # noqa: E402

OTHER = {"cats_dogs": "flowers_all", "flowers": "cats_dogs_other"}
# more unseen images of the known set, where there are some: how many of them the threshold keeps, beside the
# fixed test images (400 cats and dogs that no cats-vs-dogs model trains, validates or tests on)
FURTHER = {"cats_dogs": "cats_dogs_other"}


def predictor_of(run: Path, layers: int):
    """The run's model with its detector refitted on `layers` layers, on the same run and images: 1, the pooled base
    output alone; 2, block 14's pooled output beside it (`unknown.LAYERS`), at any size. The run itself uses 2 where
    `unknown.layers_for` says so (the base's last map 3x3 or smaller: 96 px and below), as `mobiletune predict RUN`."""
    from mobiletune import runfolder
    from mobiletune.config import load_config
    from mobiletune.data import folders
    from mobiletune.evaluation import unknown
    from mobiletune.model.network import Classifier, load_model
    from mobiletune.ship.predict import KerasPredictor

    config = load_config(run / runfolder.CONFIG)
    classifier = Classifier(load_model(run / runfolder.MODEL))
    images = folders.load_images(Path(runfolder.read_metrics(run)["data_dir"]), config.data)
    detector, _ = unknown.fit_run(classifier, images, config, layers=unknown.LAYERS if layers == 2 else ())
    return KerasPredictor(classifier.model, images.classes, detector)


def scored(run: Path, predictor, folder: Path, split: str | None = None):
    """(unknown scores, class names) of `folder`'s images (one split, or all, as the run reads folders) through
    `predictor`."""
    import numpy as np

    from mobiletune.config import load_config
    from mobiletune.data import folders, pixels

    images = folders.load_images(folder, load_config(run / "config.yaml").data)
    positions = np.arange(len(images.paths)) if split is None else images.indices(split)
    out = [predictor.scored(x)[1] for _, x, _ in pixels.iter_pixels(images, positions, predictor.size, 32)]
    return np.concatenate(out), np.array([images.classes[c] for c in images.labels[positions]])


def measure(run: Path, predictor, data: Path, others: dict[str, Path]) -> dict[str, float]:
    """Test kept, each unknown set's share flagged and the AUROC (other set against test) of `predictor`'s
    detector."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    threshold = predictor.detector.threshold
    test, _ = scored(run, predictor, data, "test")
    # the threshold is the in-distribution pool's 0.95 quantile: beside each unseen set's own, it says whether the
    # line sits where "keep 95%" puts it (docs/unknown-inputs.md, "Where the line sits")
    row = {"kept": float(np.mean(test <= threshold)), "n_test": len(test), "threshold": threshold,
           "test_p95": float(np.quantile(test, 0.95))}
    for name, folder in others.items():
        s, kinds = scored(run, predictor, folder)
        if name == "synthetic":
            row.update({k: float(np.mean(s[kinds == k] > threshold)) for k in ("flat", "text", "noise")})
        elif name == "further":
            row.update(further_kept=float(np.mean(s <= threshold)), n_further=len(s),
                       further_p95=float(np.quantile(s, 0.95)))
        else:
            row.update(flagged=float(np.mean(s > threshold)), n_other=len(s),
                       auroc=roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(s))], np.r_[test, s]))
    return row


def near_ood(root: Path, held: str, px: int, overrides: list[str], tmp: Path) -> tuple[float, float]:
    """AUROC of flowers_mini's `held` class against the test images of a model trained on the other four: (one
    layer, two layers)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    run = train(root / "near" / held, px, overrides, tmp / f"near-{held}-{px}")
    aurocs = []
    for layers in (1, 2):
        predictor = predictor_of(run, layers)
        test, _ = scored(run, predictor, root / "near" / held, "test")
        s, kinds = scored(run, predictor, unknown_sets.SHARED / "flowers_mini")
        s = s[kinds == held]
        aurocs.append(float(roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(s))], np.r_[test, s])))
    return tuple(aurocs)


def train(data: Path, px: int, overrides: list[str], out: Path) -> Path:
    from mobiletune.config import load_config
    from mobiletune.training.run import train_and_evaluate

    started = time.perf_counter()
    metrics = train_and_evaluate(load_config(overrides=[f"data.image_size={px}", *overrides]), data, out).metrics
    print(f"{data} at {px} px: trained in {time.perf_counter() - started:.0f} s, test accuracy "
          f"{metrics['after_fine_tuning']['test']['accuracy']:.1%}, unknown: {metrics['unknown']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/uk"))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(unknown_sets.SIZES))
    parser.add_argument("--px", type=int, nargs="+", default=[96, 160, 224])
    parser.add_argument("--known", nargs="+", default=list(OTHER))
    parser.add_argument("--near", nargs="*", default=["daisy", "dandelion", "roses", "sunflowers", "tulips"])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    print(host_line(), "; overrides:", args.overrides or "none (the default recipe)", flush=True)
    unknown_sets.build(args.root)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mt-unknown-") as tmp:
        for known in args.known:
            for n in args.sizes:
                for px in args.px:
                    data = args.root / known / str(n)
                    run = train(data, px, args.overrides, Path(tmp) / f"{known}-{n}-{px}")
                    others = {"other": args.root / OTHER[known], "synthetic": args.root / "synthetic",
                              **({"further": args.root / FURTHER[known]} if known in FURTHER else {})}
                    for layers in (1, 2):
                        rows.append({"known": known, "n": n, "px": px, "layers": layers,
                                     **measure(run, predictor_of(run, layers), data, others)})
                    print(rows[-2:], flush=True)
        near = {(held, px): near_ood(args.root, held, px, args.overrides, Path(tmp))
                for held in args.near for px in args.px[1:2] or args.px}
    print("\n| known | per class | px | layers | test kept | further kept | other set flagged | AUROC | flat | text "
          "| noise | threshold / test p95 / further p95 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        further = f"{r['further_kept']:.1%} ({r['n_further']})" if "further_kept" in r else "-"
        print(f"| {r['known']} | {r['n']} | {r['px']} | {r['layers']} | {r['kept']:.0%} ({r['n_test']}) | {further} | "
              f"{r['flagged']:.0%} ({r['n_other']}) | {r['auroc']:.3f} | {r['flat']:.0%} | {r['text']:.0%} | "
              f"{r['noise']:.0%} | {r['threshold']:.3f} / {r['test_p95']:.3f} / "
              f"{r.get('further_p95', float('nan')):.3f} |")
    for (held, px), (one, two) in near.items():
        print(f"near-OOD: flowers_mini without {held}, {px} px: AUROC {one:.3f} one layer, {two:.3f} two layers")


if __name__ == "__main__":
    main()
