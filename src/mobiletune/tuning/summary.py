"""What a sweep leaves for people: Optuna's plots, the accuracy-against-latency front, and the
hyper-parameter summary generated from the trials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobiletune import runfolder
from mobiletune.config import Config
from mobiletune.report import figures
from mobiletune.report.summary import worse_after
from mobiletune.runfolder import save_figure, write_text
from mobiletune.ship import latency
from mobiletune.tuning import objectives as objectives_lib

PLOTS = ("pareto_front.png", "optimization_history.png", "param_importances.png", "val_accuracy_by_knob.png")


def plot_sweep(study, space: dict[str, Any], out: Path, wanted: objectives_lib.Objectives | None = None) -> list[str]:
    """Optuna's own plots, drawn with matplotlib: history, importances, accuracy against each knob; with
    latency, the front too (`plot_front`).

    A plot Optuna cannot draw yet (too few finished trials) is left out; returns the files written.
    """
    import warnings

    import matplotlib.pyplot as plt  # Optuna draws with pyplot; each figure is closed once saved
    import optuna.visualization.matplotlib as ovm

    wanted = wanted or objectives_lib.Objectives()
    # multi-objective: Optuna's plots need to be told which value to draw; validation accuracy
    on = {"target": objectives_lib.accuracy, "target_name": "val_accuracy"} if wanted.multi else {}
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, **on),
        "param_importances.png": lambda: ovm.plot_param_importances(study, **on),
        "val_accuracy_by_knob.png": lambda: ovm.plot_slice(study, params=list(space), **on),
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
    if wanted.measures_latency and plot_front(study, wanted, out / PLOTS[0]):
        written.insert(0, PLOTS[0])
    return written


def plot_front(study, wanted: objectives_lib.Objectives, path: Path) -> bool:
    """Validation accuracy against ms per image: every finished trial a point (coloured by input size),
    the front joined, the base recipe ringed, the budget a line. False when no trial has both."""
    fmt = wanted.latency_format
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and objectives_lib.latency(t, fmt) is not None]
    if not done:
        return False
    fig, ax = figures.subplots(figsize=(7.5, 4.8))
    sizes = sorted({t.params.get("data.image_size") for t in done}, key=lambda v: (v is None, v))
    for size in sizes:
        group = [t for t in done if t.params.get("data.image_size") == size]
        ax.scatter([objectives_lib.latency(t, fmt) for t in group], [objectives_lib.accuracy(t) for t in group],
                   s=28, alpha=0.8, label=f"{size} px" if size else "trials")
    front = objectives_lib.front(study, wanted) if wanted.multi else []
    if front:
        ax.step([objectives_lib.latency(t, fmt) for t in front], [objectives_lib.accuracy(t) for t in front],
                where="post", color="black", lw=1, label="Pareto front")
    base = [t for t in done if t.user_attrs.get("note") == "the base recipe"]
    if base:
        ax.scatter([objectives_lib.latency(base[0], fmt)], [objectives_lib.accuracy(base[0])], s=160,
                   facecolors="none", edgecolors="red", lw=1.5, label="the base recipe")
    if wanted.max_latency_ms is not None:
        ax.axvline(wanted.max_latency_ms, color="gray", ls="--", label=f"budget {wanted.max_latency_ms:g} ms")
    ax.set_xlabel(f"ms per image ({fmt}, batch 1, XNNPACK)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"Accuracy against latency on {objectives_lib.hosts(study)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(path, fig)
    return True


def front_table(study, wanted: objectives_lib.Objectives, space: dict[str, Any], chosen) -> list[str]:
    """The summary's accuracy-against-latency section: the host, the budget, the front's points and knobs."""
    from mobiletune.ship.latency import BLOCKS, FORMATS, REPEATS

    if not wanted.measures_latency:
        return []
    front = objectives_lib.front(study, wanted) or [chosen]
    knobs = [k for k in space if k != "data.image_size"]
    lines = ["", "## Accuracy against latency", "",
             f"Latency: the exported model, batch 1, XNNPACK, the fastest of {BLOCKS} medians of {REPEATS} runs, "
             f"measured on **{objectives_lib.hosts(study)}**; "
             "it holds for that host only. " + (f"Budget: {wanted.max_latency_ms:g} ms ({wanted.latency_format}). "
                                       if wanted.max_latency_ms is not None else ""),
             "", "| trial | image size | val accuracy | " + " | ".join(f"ms {f}" for f in FORMATS) + " | "
             + " | ".join(f"`{k}`" for k in knobs) + " |",
             "|" + "---|" * (3 + len(FORMATS) + len(knobs))]
    for t in front:
        ms = [objectives_lib.latency(t, f) for f in FORMATS]
        mark = " (chosen)" if t.number == chosen.number else ""
        size = t.params.get("data.image_size", "-")
        lines.append(f"| {t.number}{mark} | {size} | {objectives_lib.accuracy(t):.4f} | "
                     + " | ".join("-" if m is None else f"{m:.2f}" for m in ms) + " | "
                     + " | ".join(_short(t.params.get(k, "-")) for k in knobs) + " |")
    return lines


def write_sweep_summary(path: Path, study, space: dict[str, Any], base: Config, best: Config,
                        results: dict[str, Any], wanted: objectives_lib.Objectives | None = None,
                        chosen=None) -> None:
    """The seed's hyper-parameter summary, generated from a sweep."""
    counts = results["counts"]
    lines = [
        "# Hyper-parameter summary (MobileNetV2): sweep",
        "",
        f"{len(study.trials)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + f". Search {results['search_seconds']:.0f} s; everything, the best and default runs included, "
        f"{results['total_seconds']:.0f} s.",
        "",
        "Selection used validation accuracy only (within the latency budget, when one was given). The test set "
        "was touched once per config shown below: by the run of the best config and by the run of the "
        "default recipe, never by a trial.",
        "",
    ]
    lines += _test_results(results)
    lines += _knobs(study, space, base, best, wanted)
    if wanted is not None and chosen is not None:
        lines += front_table(study, wanted, space, chosen)
    lines += ["", "## Best config", "", "```yaml", best.to_yaml().rstrip(), "```", ""]
    for name in PLOTS:
        if (path.parent / name).exists():
            lines += [f"![{name[:-4]}]({name})", ""]
    write_text(path, "\n".join(lines))


def _test_results(results: dict[str, Any]) -> list[str]:
    """The default recipe's and the best config's test figures, with what to do where fine-tuning made either
    worse."""
    lines = ["## Test set: default recipe vs best config", "",
             "| config | before fine-tuning | after fine-tuning | McNemar's exact test, before vs after |",
             "|---|---|---|---|"]
    advice = []
    for label, m in (("default recipe", results["default"]), ("best config", results["best"])):
        cells = [f"{m[s]['test']['accuracy']:.2%} (loss {m[s]['test']['loss']:.4f})"
                 for s in ("before_fine_tuning", "after_fine_tuning")]
        mc = m.get("mcnemar")  # a --baseline metrics.json may come from anywhere
        test = (f"p = {mc['p_value']:.3g} ({mc['only_after_right']} right only after, {mc['only_before_right']} "
                "only before)") if mc else "-"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {test} |")
        worse = worse_after(mc) if mc else ""
        if worse and not any(m is seen for seen, _ in advice):  # the best config may be the default's run
            advice.append((m, f"The {label}: {worse}"))
    lines += ["", *(text for _, text in advice)] if advice else []
    return lines


def _knobs(study, space: dict[str, Any], base: Config, best: Config,
           wanted: objectives_lib.Objectives | None) -> list[str]:
    """Each knob searched: its range, the default, the best value, Optuna's importance and its effect."""
    import warnings

    import optuna

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            on = {"target": objectives_lib.accuracy} if wanted is not None and wanted.multi else {}
            importances = optuna.importance.get_param_importances(study, **on)
        if any("too small to compute importances" in str(w.message) for w in caught):
            importances = {}  # Optuna made them all equal: no information, so none shown
    except (ValueError, RuntimeError, ZeroDivisionError):
        importances = {}
    lines = ["", "## The knobs: what was tried and what it did", "",
              "| knob | range tried | default | best | importance | best validation accuracy per value |",
              "|---|---|---|---|---|---|"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    for key, spec in space.items():
        tried = (", ".join(map(str, spec["choices"])) if spec["type"] == "categorical"
                 else f"{spec['low']:g} to {spec['high']:g}" + (" (log)" if spec.get("log") else ""))
        effect = _effect(complete, key, spec)
        imp = f"{importances[key]:.2f}" if key in importances else "-"
        lines.append(f"| `{key}` | {tried} | {base.flat()[key]} | {_short(best.flat()[key])} | {imp} | {effect} |")
    return lines


def write_trials_csv(study, space: dict[str, Any], path: Path) -> None:
    """Every trial: its state, validation accuracy, knobs, measured latencies (when measured) and cost."""
    measured = [objectives_lib.attr(f) for f in latency.FORMATS
                if any(objectives_lib.attr(f) in t.user_attrs for t in study.trials)]
    header = ["number", "state", "val_accuracy", *space, *measured, "seconds", "pruned_at_epoch", "worker"]
    rows = []
    for t in study.trials:
        seconds = t.duration.total_seconds() if t.duration else ""
        rows.append([t.number, t.state.name, "" if t.values is None else t.values[0],
                     *[t.params.get(k, "") for k in space], *[t.user_attrs.get(m, "") for m in measured], seconds,
                     t.user_attrs.get("pruned_at_epoch", ""), t.user_attrs.get("worker", "")])
    runfolder.write_csv(path, header, rows)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _effect(trials, key: str, spec: dict[str, Any]) -> str:
    """Best validation accuracy per choice, or per third of a numeric range."""
    if not trials:
        return "-"
    if spec["type"] == "categorical":
        groups = {str(c): [t.values[0] for t in trials if t.params.get(key) == c] for c in spec["choices"]}
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
            members = [t.values[0] for t, v in zip(trials, values, strict=True)
                       if lo <= v and (v <= hi if last else v < hi)]
            top = hi if last or not integer else hi - 1
            label = f"{lo:.0f}-{top:.0f}" if integer else f"{lo:.3g}-{hi:.3g}"
            groups[label if lo != top else f"{lo:.3g}"] = members
    return "; ".join(f"{k}: {max(v):.3f}" for k, v in groups.items() if v) or "-"
