"""What a run leaves for people: the curve plots, the hyper-parameter summary, the console table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from mobiletune.config import Config  # noqa: E402
from mobiletune.runfolder import save_figure, write_text  # noqa: E402

# What each knob means, in the seed's words, for the generated summary.
KNOB_NOTES = {
    "phase1.lr": "Learning rate of the new head; the seed's base_learning_rate",
    "phase2.lr_ratio": "Fine-tuning lr = phase1.lr x this: small steps keep the ImageNet features",
    "phase1.epochs": "Epochs of feature extraction (base frozen)",
    "phase2.epochs": "More epochs of fine-tuning, counted on from phase 1",
    "phase2.fine_tune_at": "Base layers from this index on are unfrozen; fewer unfrozen layers = less overfitting",
    "model.bn_mode": "BatchNorm kept in inference mode while fine-tuning",
}


def plot_curves(history: list[dict[str, Any]], path: Path, title: str, fine_tune_from: int | None = None) -> None:
    """Accuracy and loss, train and validation, per epoch; a line where fine-tuning starts."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_acc, ax_loss) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
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
    plt.close(fig)


RESULT_COLUMNS = ("stage", "accuracy", "95% interval", "loss")


def results_table(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for stage, label in (("before_fine_tuning", "before fine-tuning"), ("after_fine_tuning", "after fine-tuning")):
        test = metrics.get(stage, {}).get("test")
        if test:
            lo, hi = test.get("accuracy_ci95", (float("nan"), float("nan")))
            rows.append((label, f"{test['accuracy']:.2%}", f"{lo:.1%} to {hi:.1%}", f"{test['loss']:.4f}"))
    return rows


def summary_markdown(config: Config, metrics: dict[str, Any]) -> str:
    """The seed's hyper-parameter summary, generated from the run."""
    lines = ["# Hyper-parameter summary (MobileNetV2)", ""]
    lines += [
        f"Classes: {', '.join(metrics['classes'])}. Images: "
        + ", ".join(f"{k} {v}" for k, v in metrics["n_images"].items())
        + f" ({metrics.get('n_skipped', 0)} skipped).",
        f"Base: MobileNetV2 alpha {config.model.alpha}, {metrics['base_layers']} layers, weights "
        f"{config.model.weights}; fine-tuned from layer {metrics['fine_tune_at']} on "
        f"({metrics['base_layers'] - metrics['fine_tune_at']} layers unfrozen, BatchNorm in "
        f"{config.model.bn_mode} mode).",
        "Class weights: " + (", ".join(f"{c} {w:.3g}" for c, w in metrics["class_weight"].items())
                             + " (auto: balanced by training counts)" if metrics.get("class_weight")
                             else "none (every image counts the same)") + ".",
        "",
        "## Results on the test set",
        "",
        "| " + " | ".join(RESULT_COLUMNS) + " |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in results_table(metrics)]
    if "mcnemar" in metrics:
        lines += ["", mcnemar_sentence(metrics["mcnemar"])]
    lines += ["", "## Knobs that matter", "", "| knob | value | why it matters |", "|---|---|---|"]
    flat = config.flat()
    for key, note in KNOB_NOTES.items():
        lines.append(f"| `{key}` | {flat[key]} | {note} |")
    lines.append(f"| phase-2 learning rate | {config.phase1.lr * config.phase2.lr_ratio:g} | derived |")
    lines += ["", "## Every setting", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in flat.items()]
    seconds = metrics.get("seconds", {})
    if seconds:
        lines += ["", "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "."]
    lines += ["", "![before fine-tuning](before_fine_tuning.png)", ""]
    lines += ["![after fine-tuning](after_fine_tuning.png)", ""]
    return "\n".join(lines)


def write_summary(path: Path, config: Config, metrics: dict[str, Any]) -> None:
    write_text(path, summary_markdown(config, metrics))


def mcnemar_sentence(mc: dict[str, Any]) -> str:
    """Whether fine-tuning changed anything beyond chance, in one sentence."""
    return (f"McNemar's exact test, before vs after on the same images: p = {mc['p_value']:.3g} "
            f"({mc['only_after_right']} right only after, {mc['only_before_right']} right only before).")


def print_results(console, metrics: dict[str, Any], title: str = "Test set") -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in RESULT_COLUMNS:
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in results_table(metrics):
        table.add_row(*row)
    console.print(table)
    if "mcnemar" in metrics:
        console.print(mcnemar_sentence(metrics["mcnemar"]))


# ---------------------------------------------------------------------------------------------
# Sweeps


def plot_sweep(study, space: dict[str, Any], out: Path) -> list[str]:
    """Optuna's own plots, drawn with matplotlib: history, importances, accuracy against each knob.

    A plot Optuna cannot draw yet (too few finished trials) is left out; returns the files written.
    """
    import warnings

    import optuna.visualization.matplotlib as ovm

    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study),
        "param_importances.png": lambda: ovm.plot_param_importances(study),
        "val_accuracy_by_knob.png": lambda: ovm.plot_slice(study, params=list(space)),
    }
    written = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(max(7, 3.2 * len(space)) if name.startswith("val_") else 7, 4.5)
        save_figure(out / name, figure)
        plt.close(figure)
        written.append(name)
    return written


def write_sweep_summary(path: Path, study, space: dict[str, Any], base: Config, best: Config,
                        results: dict[str, Any]) -> None:
    """The seed's hyper-parameter summary, generated from a sweep."""
    import warnings

    import optuna

    counts = results["counts"]
    lines = [
        "# Hyper-parameter summary (MobileNetV2): sweep",
        "",
        f"{len(study.trials)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + f". Search {results['search_seconds']:.0f} s; everything, retrains included, "
        f"{results['total_seconds']:.0f} s.",
        "",
        "Selection used validation accuracy only. The test set was touched once per config shown below: by "
        "the final retrain of the best config and by the run of the default recipe, never by a trial.",
        "",
        "## Test set: default recipe vs best config",
        "",
        "| config | before fine-tuning | after fine-tuning |",
        "|---|---|---|",
    ]
    for label, m in (("default recipe", results["default"]), ("best config", results["best"])):
        cells = [f"{m[s]['test']['accuracy']:.2%} (loss {m[s]['test']['loss']:.4f})"
                 for s in ("before_fine_tuning", "after_fine_tuning")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importances = optuna.importance.get_param_importances(study)
        if any("too small to compute importances" in str(w.message) for w in caught):
            importances = {}  # Optuna made them all equal: no information, so none shown
    except (ValueError, RuntimeError, ZeroDivisionError):
        importances = {}
    lines += ["", "## The knobs: what was tried and what it did", "",
              "| knob | range tried | default | best | importance | best validation accuracy per value |",
              "|---|---|---|---|---|---|"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    for key, spec in space.items():
        tried = (", ".join(map(str, spec["choices"])) if spec["type"] == "categorical"
                 else f"{spec['low']:g} to {spec['high']:g}" + (" (log)" if spec.get("log") else ""))
        effect = _effect(complete, key, spec)
        imp = f"{importances[key]:.2f}" if key in importances else "-"
        lines.append(f"| `{key}` | {tried} | {base.flat()[key]} | {_short(best.flat()[key])} | {imp} | {effect} |")
    lines += ["", "## Best config", "", "```yaml", best.to_yaml().rstrip(), "```", ""]
    for name in ("optimization_history.png", "param_importances.png", "val_accuracy_by_knob.png"):
        if (path.parent / name).exists():
            lines += [f"![{name[:-4]}]({name})", ""]
    write_text(path, "\n".join(lines))


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _effect(trials, key: str, spec: dict[str, Any]) -> str:
    """Best validation accuracy per choice, or per third of a numeric range."""
    if not trials:
        return "-"
    if spec["type"] == "categorical":
        groups = {str(c): [t.value for t in trials if t.params.get(key) == c] for c in spec["choices"]}
    else:
        import numpy as np

        integer = spec["type"] == "int"
        values = np.array([t.params[key] for t in trials], float)
        edges = np.quantile(values, [0, 1 / 3, 2 / 3, 1])
        edges = np.unique(np.round(edges) if integer else edges)
        if len(edges) == 1:  # every trial drew the same value
            edges = np.repeat(edges, 2)
        groups = {}
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            last = i == len(edges) - 2  # bins are [lo, hi), the last one [lo, hi]: each trial in one
            members = [t.value for t, v in zip(trials, values, strict=True)
                       if lo <= v and (v <= hi if last else v < hi)]
            top = hi if last or not integer else hi - 1
            label = f"{lo:.0f}-{top:.0f}" if integer else f"{lo:.3g}-{hi:.3g}"
            groups[label if lo != top else f"{lo:.3g}"] = members
    return "; ".join(f"{k}: {max(v):.3f}" for k, v in groups.items() if v) or "-"
