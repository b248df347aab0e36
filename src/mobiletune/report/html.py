"""`report.html`: one self-contained page per run, built from the run folder alone.

Everything is read back from the files a run leaves (config, metrics, history, manifest,
predictions), so `mobiletune report RUN` rebuilds it without retraining. Images are embedded
as data URIs; the layout is a single column that reads on a phone and widens on a desktop.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mobiletune import runfolder
from mobiletune.data.folders import image_root
from mobiletune.data.pixels import open_image
from mobiletune.errors import UsageError
from mobiletune.report import figures
from mobiletune.report import summary as report
from mobiletune.report.results import STAGES, results_table
from mobiletune.runfolder import read_csv, write_text

CSS = """
body{font:16px/1.5 system-ui,sans-serif;margin:0 auto;max-width:980px;padding:12px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;display:block;overflow-x:auto;max-width:100%}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}.grid{display:flex;flex-wrap:wrap;gap:8px}
.grid figure{margin:0;width:120px;font-size:.8em;overflow-wrap:anywhere}
.grid img{width:120px;height:120px;object-fit:cover}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:8px}
.note{color:#666;font-size:.9em}code{background:#f4f4f4;padding:0 3px}
"""


def _png(figure) -> str:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _file_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def confusion_figure(matrix: list[list[int]], classes: list[str], title: str):
    m = np.array(matrix)
    fig, ax = figures.subplots(figsize=(1.2 + 0.7 * len(classes), 1 + 0.7 * len(classes)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def roc_figure(metrics: dict[str, Any], classes: list[str]):
    fig, ax = figures.subplots(figsize=(4.5, 4.2))
    for stage, label in STAGES:
        r = metrics[stage]["test"]["roc"]
        for c, curve in r["curves"].items():
            name = label if len(r["curves"]) == 1 else f"{label}: {classes[int(c)]}"
            ax.plot(curve["fpr"], curve["tpr"], ls="-" if stage.startswith("after") else "--", label=name)
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(fontsize=7)
    return fig


def reliability_figure(metrics: dict[str, Any]):
    fig, ax = figures.subplots(figsize=(4.5, 4.2))
    for stage, label in STAGES:
        cal = metrics[stage]["test"]["calibration"]
        xs = [b["confidence"] for b in cal["curve"]]
        ax.plot(xs, [b["accuracy"] for b in cal["curve"]], "o-", label=f"{label} (ECE {cal['ece']:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(fontsize=8)
    return fig


def thumbnail(path: Path) -> str | None:
    from PIL import Image, ImageOps

    try:
        with open_image(path) as image:
            image.draft("RGB", (160, 160))  # a JPEG decoded at a reduced scale: a 100 MP photo costs what 2 MP do
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((160, 160))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    return read_csv(path) if path.exists() else []


def build_report(run: str | Path) -> Path:
    """Write `report.html` into the run folder from its files; returns its path. A metrics.json edited or damaged
    by hand (a block missing, a number as text) is a UsageError naming what is wrong, not a traceback."""
    try:
        return _build_report(Path(run))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:120]
        raise UsageError(f"{run}: its metrics.json does not hold what a report needs ({what}); "
                         f"`mobiletune evaluate {run}` writes it again") from None


def _build_report(run: Path) -> Path:
    metrics = runfolder.read_metrics(run)
    if "mcnemar" not in metrics:  # metrics.json holds the test results of one stage, not the comparison
        raise UsageError(f"{run}: metrics.json has no before/after comparison; run `mobiletune evaluate {run}`")
    config = yaml.safe_load((run / runfolder.CONFIG).read_text())
    classes = metrics["classes"]
    parts = [f"<h1>mobiletune run: {html.escape(run.resolve().name)}</h1>"]
    if (run / runfolder.MODEL_CARD).is_file():
        parts.append('<p>Intended use, data, results and limits on one page: '
                     f'<a href="{runfolder.MODEL_CARD}">{runfolder.MODEL_CARD}</a>.</p>')

    parts += _results(metrics)
    parts.append("<h2>Curves</h2><div class='pair'>")
    for name in (runfolder.CURVES_BEFORE, runfolder.CURVES_AFTER):
        if (run / name).exists():
            parts.append(_img(_file_png(run / name), name))
    parts.append("</div><h2>Confusion matrices, ROC, calibration</h2><div class='pair'>")
    for stage, label in STAGES:
        parts.append(_img(_png(confusion_figure(metrics[stage]["test"]["confusion_matrix"], classes, label)),
                          f"confusion matrix {label}"))
    parts.append(_img(_png(roc_figure(metrics, classes)), "ROC curves"))
    parts.append(_img(_png(reliability_figure(metrics)), "reliability diagram"))
    parts.append("</div>")

    parts.append(_unknown_inputs(run, metrics))
    parts.append(_misclassified(run, metrics, classes))
    parts.append(_exports(run))
    parts.append(_data_summary(run, metrics))
    parts.append("<h2>Hyper-parameters</h2>")
    parts.append(_table(["key", "value"], [[f"{s}.{k}", v] for s, fields in config.items()
                                            for k, v in fields.items()]))
    parts.append("<h2>Time and environment</h2>")
    parts.append(_table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in metrics.get("seconds", {}).items()]))
    parts.append(_table(["what", "value"], [[k, v] for k, v in metrics.get("environment", {}).items()]))
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>mobiletune report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = run / runfolder.REPORT
    write_text(path, page)
    return path


def _results(metrics: dict[str, Any]) -> list[str]:
    """The results table (the 95% interval is Wilson's), McNemar's test, and the per-class figures."""
    mc, n, results = metrics["mcnemar"], metrics["after_fine_tuning"]["test"]["n"], results_table(metrics)
    worse = report.worse_after(mc)
    verdict = ("The difference is significant at 5%." if report.significant(mc)
               else "At this test-set size the difference is not significant at 5%.")
    per_class = metrics["after_fine_tuning"]["test"]["per_class"]
    return [
        "<h2>Test set, before and after fine-tuning</h2>",
        _table(list(results.columns), results.rows),
        f"<p>McNemar's exact test on the same {n} images: p = {mc['p_value']:.3g}. "
        f"{mc['only_after_right']} images right only after fine-tuning, {mc['only_before_right']} right only "
        f"before. {verdict}{' ' + html.escape(worse) if worse else ''}</p>",
        "<h2>Per class (after fine-tuning)</h2>",
        _table(["class", "precision", "recall", "F1", "support"], [
            [c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
            for c, v in per_class.items()]),
    ]


def unknown_figure(scores: np.ndarray, correct: np.ndarray, threshold: float, name: str):
    """Test scores with the threshold, and accuracy among the images kept as the threshold moves."""
    fig, (left, right) = figures.subplots(1, 2, figsize=(9, 3.6))
    left.hist(scores, bins=30, color="#4c72b0")
    left.axvline(threshold, color="#c44e52", label=f"threshold {threshold:.3g}")
    left.set_xlabel(f"unknown-input score ({name}); higher: less like training")
    left.set_ylabel("test images")
    left.legend(fontsize=8)
    order = np.argsort(scores, kind="stable")
    kept = np.arange(1, len(order) + 1)
    right.plot(kept / len(order), np.cumsum(correct[order]) / kept)
    right.axvline(np.mean(scores <= threshold), color="#c44e52", label="at the threshold")
    right.set_xlabel("coverage (share of test images kept)")
    right.set_ylabel("accuracy on the kept images")
    right.legend(fontsize=8)
    return fig


def _unknown_inputs(run: Path, metrics: dict[str, Any]) -> str:
    found = metrics.get("unknown")
    rows = [r for r in _read_csv(run / runfolder.PREDICTIONS) if r.get("unknown_score")]
    if not found or not rows:
        return ""
    scores = np.array([float(r["unknown_score"]) for r in rows])
    correct = np.array([r["true"] == r["predicted_after"] for r in rows], dtype=float)
    return ("<h2>Unknown inputs</h2>"
            f"<p><code>mobiletune predict</code> calls an image <em>unknown</em> when its {found['score']} score "
            f"is above {found['threshold']:.4g} (<code>predict.keep</code> of the validation images and, for knn, of "
            f"the training images left out in turn). It keeps {found['validation_kept']:.1%} of the validation "
            f"and {found['test_kept']:.1%} of the test images.</p>"
            + _img(_png(unknown_figure(scores, correct, found["threshold"], found["score"])),
                   "unknown-input scores and accuracy against coverage"))


def _misclassified(run: Path, metrics: dict[str, Any], classes: list[str], limit: int = 60) -> str:
    rows = [r for r in _read_csv(run / runfolder.PREDICTIONS) if r["true"] != r["predicted_after"]]
    out = [f"<h2>Misclassified test images after fine-tuning ({len(rows)})</h2>"]
    data_dir = image_root(metrics.get("data_dir", ""))
    cards, missing = [], 0
    for r in rows[:limit]:
        thumb = thumbnail(data_dir / r["path"]) if metrics.get("data_dir") else None
        if thumb is None:
            missing += 1
            continue
        p = float(r[f"p_after_{r['predicted_after']}"])
        cards.append(f"<figure>{_img(thumb, r['path'])}<figcaption>{html.escape(r['path'])}<br>"
                       f"true {html.escape(r['true'])}, predicted {html.escape(r['predicted_after'])} "
                       f"({p:.0%})</figcaption></figure>")
    out.append(f"<div class='grid'>{''.join(cards)}</div>")
    if missing:
        out.append(f"<p class='note'>{missing} image(s) not shown: not found under {html.escape(str(data_dir))}.</p>")
    if len(rows) > limit:
        out.append(f"<p class='note'>First {limit} of {len(rows)} shown; all are in test_predictions.csv.</p>")
    return "".join(out)


def _exports(run: Path) -> str:
    """The re-test table of `mobiletune export`, when the run has been exported."""
    result = runfolder.read_export_record(run / runfolder.EXPORT)
    if result is None:
        return ""
    rows = [[c["format"], f"{c['accuracy']:.2%}", f"{c['agreement']:.2%}", f"{c['max_abs_diff']:.1e}",
             f"{c['megabytes']:.2f}", f"{c['ms_per_image']:.2f}"] for c in result["checks"]]
    return (f"<h2>Exports (Keras accuracy {result['keras_accuracy']:.2%})</h2>"
            + _table(["format", "accuracy", "agreement with Keras", "max abs prob diff", "MB", "ms/image"], rows))


def _data_summary(run: Path, metrics: dict[str, Any]) -> str:
    classes = metrics["classes"]
    splits = ("train", "validation", "test")
    counts = runfolder.split_counts(run)
    rows = [[c, *[counts.get((c, s), 0) for s in splits]] for c in classes]
    skipped = _read_csv(run / runfolder.SKIPPED)
    out = ["<h2>Data</h2>", _table(["class", *splits], rows)]
    out.append(f"<p>{len(skipped)} file(s) skipped.</p>")
    if skipped:
        out.append(_table(["file", "reason"], [[s["path"], s["reason"]] for s in skipped[:50]]))
    out.append(_audit_summary(metrics.get("audit")))
    return "".join(out)


def _audit_summary(found: dict[str, Any] | None) -> str:
    """The audit's counts, and what the test accuracy is without the test images that have a copy in train."""
    if not found:
        return '<p class="note">No data audit in this run (data.audit=none, or --no-cache).</p>'
    counts = [[k.replace("_", " "), found[k]] for k in ("exact_duplicate", "near_duplicate", "label_error",
                                                        "outlier", "leaks")]
    out = ["<h3>Audit</h3>", _table(["finding", "count"], counts)]
    clean = found.get("test_without_leaks") or {}
    if found.get("leaked_test_images") and clean.get("images"):
        out.append(f"<p>{len(found['leaked_test_images'])} test image(s) have a copy in train. On the other "
                   f"{clean['images']}: accuracy {clean['before']:.2%} before and {clean['after']:.2%} after "
                   "fine-tuning.</p>")
    elif found.get("leaked_test_images"):
        out.append("<p>Every test image has a copy in train: the test accuracy says little.</p>")
    out.append('<p class="note">Every finding, with paths: audit.csv in the run folder.</p>')
    return "".join(out)
