"""What a run leaves for people: the curve plots, the hyper-parameter summary, the console table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobiletune import runfolder
from mobiletune.config import Config
from mobiletune.report import figures
from mobiletune.report.results import results_table
from mobiletune.runfolder import save_figure, write_text

SIGNIFICANCE = 0.05  # McNemar's p below this: fine-tuning changed the test results beyond chance

# What each knob means, in the seed's words, for the generated summary.
KNOB_NOTES = {
    "phase1.lr": "Learning rate of the new head; the seed's base_learning_rate",
    "phase2.lr_ratio": "Fine-tuning lr = phase1.lr x this: small steps keep the ImageNet features",
    "phase1.epochs": "Epochs of feature extraction (base frozen)",
    "phase1.min_steps": "Phase 1 takes at least this many optimizer steps: a small folder's epochs pass over its "
                        "images several times (0: one pass an epoch, the seed's exact recipe)",
    "phase2.epochs": "More epochs of fine-tuning, counted on from phase 1",
    "phase2.fine_tune_at": "Base layers from this index on are unfrozen; fewer unfrozen layers = less overfitting",
    "model.bn_mode": "BatchNorm kept in inference mode while fine-tuning",
}


def plot_curves(history: list[dict[str, Any]], path: Path, title: str, fine_tune_from: int | None = None) -> None:
    """Accuracy and loss, train and validation, per epoch; a line where fine-tuning starts."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_acc, ax_loss) = figures.subplots(2, 1, figsize=(7, 7), sharex=True)
    for ax, metric in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.plot(epochs, [r[metric] for r in history], "o-", ms=3, label=f"training {metric}")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "o-", ms=3, label=f"validation {metric}")
        if fine_tune_from is not None:
            ax.axvline(fine_tune_from - 0.5, color="gray", ls="--", label="start fine-tuning")
        ax.set_ylabel(metric.capitalize())
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if metric == "accuracy" else "upper right")
    ax_acc.set_title(title)
    ax_loss.set_xlabel("epoch")
    save_figure(path, fig)


def summary_markdown(config: Config, metrics: dict[str, Any]) -> str:
    """The seed's hyper-parameter summary, generated from the run."""
    lines = ["# Hyper-parameter summary (MobileNetV2)", ""]
    lines += [
        f"Classes: {', '.join(metrics['classes'])}. Images: "
        + ", ".join(f"{k} {v}" for k, v in metrics["n_images"].items())
        + f" ({metrics.get('n_skipped', 0)} skipped)." + (f" Note: {metrics['balance_note']}."
                                                           if metrics.get("balance_note") else ""),
        f"Base: MobileNetV2 alpha {config.model.alpha}, {metrics['base_layers']} layers, weights "
        f"{config.model.weights}; fine-tuned from layer {metrics['fine_tune_at']} on "
        f"({metrics['base_layers'] - metrics['fine_tune_at']} layers unfrozen, BatchNorm in "
        f"{config.model.bn_mode} mode).",
        "Class weights: " + (", ".join(f"{c} {w:.3g}" for c, w in metrics["class_weight"].items())
                             + " (auto: balanced by training counts)" if metrics.get("class_weight")
                             else "none (every image counts the same)") + ".",
        *schedule_lines(config, metrics),
        "",
        "## Results on the test set",
        "",
        *results_table(metrics, brief=True).markdown(),
    ]
    if "mcnemar" in metrics:
        lines += ["", mcnemar_sentence(metrics["mcnemar"])]
    lines += ["", "## Knobs that matter", "", "| knob | value | why it matters |", "|---|---|---|"]
    flat = config.flat()
    for key, note in KNOB_NOTES.items():
        lines.append(f"| `{key}` | {flat[key]} | {note} |")
    lines.append(f"| phase-2 learning rate | {config.phase_lr(2):g} | derived |")
    lines += ["", "## Every setting", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in flat.items()]
    seconds = metrics.get("seconds", {})
    if seconds:
        lines += ["", "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "."]
    if metrics.get("weights_from_trial") is not None:
        lines += ["", f"Weights: those of sweep trial {metrics['weights_from_trial']}, which trained this same config "
                      "on the same split with the same seed; tested here, not trained again (phase times are "
                      "the evaluations')."]
    lines += ["", f"![before fine-tuning]({runfolder.CURVES_BEFORE})", "",
              f"![after fine-tuning]({runfolder.CURVES_AFTER})", ""]
    return "\n".join(lines)


def schedule_lines(config: Config, metrics: dict[str, Any]) -> list[str]:
    """Which recipe ran and the epochs it took; and the input size's trade-off, while it is below the 224 px the
    ImageNet weights were trained at."""
    lines = []
    if "schedule" in metrics:
        s, p1 = metrics["schedule"], config.phase1
        recipe = ("the seed's exact recipe (phase1.min_steps=0: one pass over the training images an epoch)"
                  if p1.min_steps == 0 else f"phase 1 takes at least phase1.min_steps={p1.min_steps} optimizer steps "
                  "(0 gives the seed's exact recipe)")
        first = (f"Phase 1: {p1.epochs} epoch(s), each {s['passes_per_epoch']} pass(es) over the training images in "
                 f"{s['phase1_steps_per_epoch']} optimizer steps" if p1.epochs else "Phase 1: none (phase1.epochs=0)")
        lines.append(f"Schedule: {recipe if p1.epochs else 'the head is not trained on its own'}. {first}; phase 2: "
                     f"{config.phase2.epochs} epoch(s) of {s['phase2_steps_per_epoch']} steps.")
    if config.data.image_size < 224 and config.model.weights == "imagenet":
        lines.append(f"Input size: {config.data.image_size} px. The ImageNet weights were trained at 224 px, and "
                     "larger inputs tend to test better (cats vs dogs: 99.5% at 192 px against 96% at 160 px, "
                     "docs/benchmarks.md) for compute that grows with the square of the size: --set "
                     "data.image_size=224, or let `mobiletune sweep` search it.")
    return lines


def write_summary(path: Path, config: Config, metrics: dict[str, Any]) -> None:
    write_text(path, summary_markdown(config, metrics))


def mcnemar_sentence(mc: dict[str, Any]) -> str:
    """Whether fine-tuning changed anything beyond chance, in one sentence (and `worse_after`'s advice)."""
    sentence = (f"McNemar's exact test, before vs after on the same images: p = {mc['p_value']:.3g} "
                f"({mc['only_after_right']} right only after, {mc['only_before_right']} right only before).")
    return f"{sentence} {worse_after(mc)}".rstrip()


def significant(mc: dict[str, Any]) -> bool:
    """McNemar's test says before and after differ beyond chance, at the 5% level every report uses."""
    return bool(mc) and mc["p_value"] < SIGNIFICANCE


def worse_after(mc: dict[str, Any]) -> str:
    """What to do when fine-tuning made the model worse beyond chance, else "". On a small folder RMSprop's
    first steps at a high phase-2 learning rate can undo what phase 1 learnt: flowers_mini with phase-2 lr
    1e-4 went from 80% to 40% on the test set."""
    if significant(mc) and mc["only_before_right"] > mc["only_after_right"]:
        return ("Fine-tuning made the model worse (the head alone, before_fine_tuning.keras, did better): "
                "train again with a lower phase2.lr_ratio or fewer phase2.epochs.")
    return ""


def print_results(console, metrics: dict[str, Any], title: str = "Test set") -> None:
    console.print(results_table(metrics, brief=True).rich(title))
    if "mcnemar" in metrics:
        console.print(mcnemar_sentence(metrics["mcnemar"]))
