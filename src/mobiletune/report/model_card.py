"""`model_card.md`: what a model is for, what it was trained and tested on, how well it does, where
it fails, and what produced it. Generated from the run folder alone, like report.html, so a run
and each of its exports carry the same card (exports add their re-test table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mobiletune import runfolder
from mobiletune.report.results import results_table
from mobiletune.report.summary import worse_after
from mobiletune.runfolder import write_text

__all__ = ["model_card_markdown", "write_model_card"]

UNKNOWN_DOC = "docs/unknown-inputs.md"  # where the scores were compared on images of other kinds


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _parent(metrics: dict[str, Any]) -> list[str]:
    parent = metrics.get("parent")
    if not parent:
        return []
    return ["", f"Retrained from the run `{parent['run']}` (`--from`; its model.keras sha256 "
            f"`{parent['model_sha256'][:12]}…`, test accuracy {_pct(parent['test_accuracy'])} on its own test set): "
            "its weights, then a shorter fine-tuning on this data. Its training images stayed in train."]


def _data(run: Path, metrics: dict[str, Any]) -> list[str]:
    splits = ("train", "validation", "test")
    counts = runfolder.split_counts(run)
    lines = ["## Data", "", f"From `{metrics.get('data_dir', '?')}`: "
             + ", ".join(f"{k} {v}" for k, v in metrics["n_images"].items())
             + f" images, {metrics.get('n_skipped', 0)} skipped (skipped.csv). The split is in split.csv.", "",
             "| class | " + " | ".join(splits) + " |", "|---|---|---|---|"]
    lines += [f"| {c} | " + " | ".join(str(counts.get((c, s), 0)) for s in splits) + " |" for c in metrics["classes"]]
    audit = metrics.get("audit")
    if audit:
        found = ", ".join(f"{audit[k]} {k.replace('_', ' ')}" for k in
                          ("exact_duplicate", "near_duplicate", "label_error", "outlier", "leaks"))
        lines += ["", f"Audit findings: {found} (audit.csv)."]
        clean = audit.get("test_without_leaks") or {}
        if audit.get("leaked_test_images") and clean.get("images"):
            lines.append(f"{len(audit['leaked_test_images'])} test image(s) have a copy in train; without them the "
                         f"test accuracy after fine-tuning is {_pct(clean['after'])} on {clean['images']} images.")
    return lines


def _results(metrics: dict[str, Any]) -> list[str]:
    lines = ["## Test results", "", "The shipped model is the one after fine-tuning; ECE is the calibration error.", "",
             *results_table(metrics).markdown()]
    lines += ["", "Per class, fine-tuned model:", "", "| class | precision | recall | F1 | test images |",
              "|---|---|---|---|---|"]
    lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for c, v in metrics["after_fine_tuning"]["test"]["per_class"].items()]
    return lines


def _unknown(metrics: dict[str, Any]) -> list[str]:
    found = metrics.get("unknown")
    if not found:
        return ["## Unknown inputs", "", "This run has no unknown-input threshold (made before mobiletune had one)."]
    return ["## Unknown inputs", "",
            f"Score: {found['score']}; an image scoring above {found['threshold']:.4g} is called unknown. The "
            f"threshold is the predict.keep share of the validation images (and, for knn, of the training images "
            f"left out in turn); it keeps {_pct(found['validation_kept'])} of the validation images and "
            f"{_pct(found['test_kept'])} of the test images.",
            "The false-accept rate (images of other kinds called one of the classes) depends on those kinds, and no "
            f"set of them was given to this run; on the project's measurements ({UNKNOWN_DOC}) see the rate for "
            "cats vs dogs with flowers as unknown and the reverse. Measure it on the inputs you expect."]


def _limits(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    n = metrics["after_fine_tuning"]["test"]["n"]
    lo, hi = metrics["after_fine_tuning"]["test"]["accuracy_ci95"]
    return ["## Known limits", "",
            f"- Tested on {n} images: the true accuracy lies anywhere from {_pct(lo)} to {_pct(hi)} with 95% "
            "confidence; one image is " + f"{100 / n:.2g} points.",
            f"- Trained and tested on images like these only, at {config['data']['image_size']} px. Other cameras, "
            "lighting, framing or kinds of images can do worse without warning beyond the unknown-input score.",
            f"- Augmentation assumed the classes look the same under flip `{config['augment']['flip']}` and "
            f"rotation up to {config['augment']['rotation']} of a turn.",
            "- Probabilities are the model's own; check the calibration error above before reading them as odds.",
            "- Not evaluated for fairness across groups of people or for safety-critical use.",
            *([f"- {worse}"] if (worse := worse_after(metrics.get("mcnemar", {}))) else [])]


def _metadata(info: dict[str, Any] | None, classes: list[str]) -> list[str]:
    """What every .tflite export carries as TFLite Model Metadata (MediaPipe Tasks reads it)."""
    if not info:
        return []
    unknown = info.get("unknown_threshold")
    return ["### What the .tflite files carry (TFLite Model Metadata, read by MediaPipe Tasks)", "",
            f"- Name `{info['name']}`, version `{info['version']}`, license `{info['license'] or 'not set'}`, "
            f"author `{info['author'] or 'not set'}`; the description says what the model tells apart and its "
            "test accuracy.",
            "- Input `image`: RGB pixels 0-255 at the trained size (normalisation mean 0, std 1: the model scales "
            "them itself); an int8 file with uint8 input takes the pixels as they are (scale 1, zero point 0).",
            f"- Output `probabilities`: one per class, named by `labels.txt` inside the file ({', '.join(classes)}).",
            (f"- Output `unknown`: the unknown-input score, a second head. Its score threshold, {unknown:.6g}, is in "
             "the metadata: MediaPipe lists the category `unknown` only for inputs above it."
             if unknown is not None else "- No unknown head: the run has no unknown-input detector."), ""]


def model_card_markdown(run: Path, exports: dict[str, Any] | None = None) -> str:
    """The card for the run in `run`; `exports` (export.json) adds the re-test of each exported format."""
    metrics = runfolder.read_metrics(run)
    config = yaml.safe_load((run / runfolder.CONFIG).read_text())
    env = metrics.get("environment", {})
    classes = metrics["classes"]
    lines = [f"# Model card: {run.resolve().name}", "",
             f"An image classifier for {len(classes)} classes ({', '.join(classes)}): MobileNetV2 (alpha "
             f"{config['model']['alpha']}, ImageNet-pretrained base) fine-tuned by mobiletune from layer "
             f"{metrics['fine_tune_at']} of {metrics['base_layers']}, input {config['data']['image_size']} px RGB "
             "(0-255; scaling is inside the model).", *_parent(metrics), "",
             "## Intended use", "",
             f"Telling apart {', '.join(classes)} in images like the training images. Images of other kinds should "
             "be called unknown (below), not forced into a class. Not for decisions about people, or where a "
             "mistake is costly, without a test on the images it will really see.", ""]
    lines += _data(run, metrics) + [""] + _results(metrics) + [""] + _unknown(metrics) + [""]
    if exports:
        lines += ["## Exports, re-tested on the test set", "",
                  "| format | accuracy | agreement with Keras | unknown flags as the run's | MB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['format']} | {_pct(c['accuracy'])} | {_pct(c['agreement'])} | "
                  f"{'-' if c.get('unknown_agreement') is None else _pct(c['unknown_agreement'])} | "
                  f"{c['megabytes']:.2f} |" for c in exports["checks"]]
        lines += [""] + _metadata(exports.get("metadata"), classes)
    lines += _limits(config, metrics) + [""]
    lines += ["## Provenance", "",
              f"- Base weights sha256: `{env.get('base_weights_sha256', '?')}`",
              "- Versions: " + ", ".join(f"{k} {env[k]}" for k in ("mobiletune", "tensorflow", "keras", "python")
                                         if k in env),
              f"- Machine: {env.get('platform', '?')}, {env.get('cpus', '?')} CPUs",
              "- Every setting: config.yaml; every number here: metrics.json; the full report: report.html.", ""]
    return "\n".join(lines)


def write_model_card(run: Path, dest: Path | None = None, exports: dict[str, Any] | None = None) -> Path:
    """Write the card into `dest` (default: the run folder); returns its path."""
    path = (dest or run) / runfolder.MODEL_CARD
    write_text(path, model_card_markdown(run, exports))
    return path
