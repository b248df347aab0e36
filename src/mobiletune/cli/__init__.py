"""`mobiletune`: a thin command line over the library.

Every command calls one library function. A `MobiletuneError` becomes one line on stderr and
its exit code (2 usage and config, 1 data and models); so does an `OSError` the machine raises
(a full disk, a folder removed under us: exit 1). Nothing else is caught here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mobiletune.cli.cache import cache_app
from mobiletune.cli.common import console, err_console, one_line_errors
from mobiletune.quiet import import_tensorflow
from mobiletune.version import __version__

app = typer.Typer(
    name="mobiletune",
    help="Fine-tune a pretrained MobileNetV2 on your own images: train, report, ship.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help texts are plain text: rich markup would eat "[default: ...]", "mobiletune[ray]"
)
app.add_typer(cache_app, name="cache")


def _version(value: bool) -> None:
    if value:
        console.print(f"mobiletune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune a pretrained MobileNetV2 on your own images."""


ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML recipe; its keys override the defaults.")
]
MlflowOption = Annotated[
    Optional[str],
    typer.Option("--mlflow", help="Log to this MLflow tracking server (URI) [default: $MLFLOW_TRACKING_URI]; "
                 "needs pip install 'mobiletune\\[mlflow]'.", metavar="URI"),
]
RayOption = Annotated[
    Optional[str],
    typer.Option("--ray", help="Run the frozen-feature pass on this Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
                 "(needs mobiletune[ray]).", metavar="ADDRESS"),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one key, e.g. --set phase2.fine_tune_at=80 (repeatable)."),
]


@app.command()
@one_line_errors
def train(
    data_dir: Annotated[
        Optional[Path], typer.Argument(help="Class folders, or train/ validation/ \\[test/] of class folders, or a CSV "
                                       "with columns path,label\\[,split] (paths relative to the CSV).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")] = Path("runs/latest"),
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Reuse a non-empty --out folder.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop on an unreadable image instead of skipping it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the results.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Run the plain recipe: every epoch through the whole network.")
    ] = False,
    resume: Annotated[
        Optional[Path],
        typer.Option("--resume", help="Continue this run folder after a crash, kill -9 or Ctrl-C, from its last "
                     "epoch checkpoint."),
    ] = None,
    full_audit: Annotated[
        bool, typer.Option("--audit", help="Also look for likely label errors and off-topic images (duplicates and "
                           "cross-split leaks are always checked).")
    ] = False,
    exclude: Annotated[
        Optional[Path], typer.Option("--exclude", help="Leave out the files of an audit.csv (or a list of paths "
                                     "relative to DATA_DIR); each is listed in skipped.csv.")
    ] = None,
    mlflow: MlflowOption = None,
    parent: Annotated[
        Optional[Path], typer.Option("--from", help="Retrain from this finished run (same classes): its weights, "
                                     "a shorter schedule, its training images kept in train.")
    ] = None,
    ray: RayOption = None,
) -> None:
    """Run the recipe: train a head on the frozen base, fine-tune the top, evaluate before and after."""
    from mobiletune import api

    run = api.train(data_dir, out, config=config, overrides=set_, overwrite=overwrite, strict=strict,
                    cache=not no_cache, audit=full_audit, exclude=exclude, resume=resume, mlflow=mlflow,
                    verbose=not quiet, parent=parent, ray=ray)
    if quiet:
        from mobiletune.report.summary import print_results

        print_results(console, run.metrics)


RunArgument = Annotated[Path, typer.Argument(help="A run folder made by `mobiletune train`.")]


@app.command("evaluate")
@one_line_errors
def evaluate_command(
    run: RunArgument,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="Evaluate on every image of these class folders (or "
                                                                  "every row of this labels CSV) instead.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="With --data: folder for evaluation.json and test_predictions.csv (default: "
                            "RUN/evaluations/NAME of --data). The run's own files are left as they are.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Reuse a non-empty --out folder.")] = False,
) -> None:
    """Re-evaluate a run before and after fine-tuning, with intervals and McNemar's test: on its test split
    (report.html rebuilt), or with --data on other labelled images (into a folder of their own)."""
    from mobiletune import runfolder
    from mobiletune.data.folders import check_source
    from mobiletune.evaluation.run import evaluate_run, evaluation_folder
    from mobiletune.report.summary import print_results

    runfolder.read_metrics(run)  # a folder that is no finished run is refused before TensorFlow starts
    if data is not None:
        check_source(data)  # so is a missing --data
    where = evaluation_folder(run, data, out, overwrite)  # and a --out it must not write into
    import_tensorflow()
    block = evaluate_run(run, data, out, overwrite)
    print_results(console, block, title="Test set" if data is None else f"Images in {data}")
    if where is None:
        console.print(f"report: {run / runfolder.REPORT}")  # McNemar's test is in print_results' lines
    else:
        console.print(f"results: {where / runfolder.EVALUATION}")


@app.command("report")
@one_line_errors
def report_command(run: RunArgument) -> None:
    """Rebuild report.html of a run from its folder, without retraining."""
    from mobiletune.report.html import build_report

    console.print(f"report: {build_report(run)}")


@app.command("audit")
@one_line_errors
def audit_command(
    data_dir: Annotated[Path, typer.Argument(help="The same DATA_DIR as for train.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for audit.csv and audit.html.")] = Path(
        "runs/audit"),
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Reuse a non-empty --out folder.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="List every image under every check in audit.csv, ranked "
                                       "(by default: the findings, then the next most suspicious 1% to review).")
                    ] = False,
    ray: RayOption = None,
) -> None:
    """Find duplicates, copies across splits, likely label errors and off-topic images; write audit.csv and .html."""
    from rich.table import Table

    from mobiletune import api
    from mobiletune.audit.checks import ISSUES

    found = api.audit_folder(data_dir, out, config=config, overrides=set_, overwrite=overwrite, all_images=all_,
                             ray=ray)
    table = Table(title=f"audit of {found['images']:,} images ({found['skipped']} skipped)")
    table.add_column("issue")
    table.add_column("images", justify="right")
    for issue in ISSUES:
        table.add_row(issue.replace("_", " "), f"{found[issue]:,}")
    table.add_row("duplicates across train and validation/test (leaks)", f"{found['leaks']:,}")
    table.add_row("duplicates filed under two classes", f"{found['across_classes']:,}")
    console.print(table)
    if found["kinds"]:
        console.print("what ImageNet takes each class for (off-topic images have little belief in it): "
                      + ", ".join(f"{cls}: {kind}" for cls, kind in found["kinds"].items()))
    out = Path(found["out"])
    if found["skipped"]:
        console.print(f"skipped: {found['skipped']} file(s), each with its reason in {out / 'skipped.csv'}")
    console.print(f"details: {out / 'audit.csv'} (the findings, then the next most suspicious to review) and "
                  f"{out / 'audit.html'} (tick images, download them as an exclude list); leave the findings out "
                  f"with mobiletune train {data_dir} --exclude {out / 'audit.csv'}")


@app.command()
@one_line_errors
def sweep(
    data_dir: Annotated[Path, typer.Argument(help="The same DATA_DIR as for train.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder; rerun or share it to continue.")] = Path(
        "runs/sweep"),
    trials: Annotated[int, typer.Option("--trials", "-n", help="Finished trials the study should hold.")] = 16,
    space: Annotated[
        Optional[Path], typer.Option("--space", help="YAML search space: key: {type, low, high[, log]} | [choices].")
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option("--storage", help="Optuna RDB URL shared by workers, e.g. postgresql://user@host/db "
                     "[default: sqlite file in --out]."),
    ] = None,
    study: Annotated[str, typer.Option("--study", help="Study name within the storage.")] = "mobiletune",
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Stop starting trials after this many "
                                                      "seconds.")] = None,
    grace_period: Annotated[int, typer.Option("--grace-period", help="Seconds without a heartbeat before a "
                                              "killed worker's trial is failed.")] = 60,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="A run folder of the default recipe to "
                                                     "compare against, instead of training one.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result.")] = False,
    mlflow: MlflowOption = None,
    objectives: Annotated[str, typer.Option("--objectives", help="accuracy, or accuracy,latency: trade validation "
                                            "accuracy against the measured latency of the exported model (a Pareto "
                                            "front).")] = "accuracy",
    max_latency_ms: Annotated[Optional[float], typer.Option("--max-latency-ms", help="Take the most accurate "
                                                             "trial whose latency is within this many ms.")] = None,
    latency_format: Annotated[str, typer.Option("--format", help="Whose latency counts: tflite (float) or "
                                                "tflite-int8.")] = "tflite",
    workers: Annotated[int, typer.Option("--workers", "-w", help="Worker processes on this machine; more than 1 "
                                         "pays where a trial leaves cores idle (small data, many cores). With "
                                         "--ray: trial workers on the cluster's nodes, one CPU each.")] = 1,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS", help="Run the trials (--workers of them) on this Ray cluster: auto, HOST:PORT or "
        "ray://HOST:PORT (needs mobiletune[ray]); on several machines, DATA_DIR at the same path on each and a "
        "PostgreSQL --storage.")] = None,
) -> None:
    """Tune the recipe with Optuna: pruned trials on cached features, then test the best config once."""
    from mobiletune import api

    results = api.sweep(data_dir, out, trials=trials, space=space, storage=storage, study=study, timeout=timeout,
                        grace_period=grace_period, baseline=baseline, config=config, overrides=set_,
                        mlflow=mlflow, objectives=objectives, max_latency_ms=max_latency_ms,
                        latency_format=latency_format, workers=workers, ray=ray, verbose=not quiet)
    after = results["best"]["after_fine_tuning"]["test"]
    default = results["default"]["after_fine_tuning"]["test"]
    console.print(f"best config (trial {results['best_trial']}): test accuracy {after['accuracy']:.2%} after "
                  f"fine-tuning, default recipe {default['accuracy']:.2%}; summary: {out / 'summary.md'}")


@app.command("export")
@one_line_errors
def export_command(
    run: RunArgument,
    format_: Annotated[
        list[str],
        typer.Option("--format", "-f", help="keras, savedmodel, tflite, tflite-fp16, tflite-int8, onnx, all "
                     "(each of those) or web (repeatable)."),
    ] = ["all"],  # noqa: B006 - typer reads the default, never mutates it
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder [default: RUN/export].")] = None,
    max_drop: Annotated[float, typer.Option("--max-drop", help="Fail when an export's accuracy is more than "
                                            "this many points below the Keras model's.")] = 1.0,
    int8_io: Annotated[bool, typer.Option("--int8-io", help="tflite-int8 with uint8 input and output "
                                          "(integer-only devices) instead of float.")] = False,
    name: Annotated[str, typer.Option("--name", help="Model name in the .tflite metadata [default: the run "
                                      "folder's name].")] = "",
    version: Annotated[str, typer.Option("--model-version", help="Version in the metadata [default: the "
                                         "model file's sha256, first 12 digits].")] = "",
    license_: Annotated[str, typer.Option("--license", help="License in the metadata, e.g. Apache-2.0.")] = "",
    author: Annotated[str, typer.Option("--author", help="Author in the metadata.")] = "",
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out folder that holds no export.")] = False,
) -> None:
    """Export the run's model; re-test each format with its own runtime on the test set. `--format web` writes a
    page that runs the .tflite in a browser (serve the folder, e.g. `python3 -m http.server`)."""
    from rich.table import Table

    import_tensorflow()  # before export's checks: they name a bad --format or --max-drop before the folder
    from mobiletune.ship.export import export_run

    result = export_run(run, format_, out, max_drop=max_drop, int8_io=int8_io,
                        about={"name": name, "version": version, "license": license_, "author": author},
                        overwrite=overwrite)
    table = Table(title=f"exports in {result['out']} (Keras accuracy {result['keras_accuracy']:.2%})")
    for column in ("format", "accuracy", "agreement", "unknown as the run", "max abs diff", "MB", "ms/image"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for c in result["checks"]:
        unknown = "-" if c.get("unknown_agreement") is None else f"{c['unknown_agreement']:.2%}"
        table.add_row(c["format"], f"{c['accuracy']:.2%}", f"{c['agreement']:.2%}", unknown,
                      f"{c['max_abs_diff']:.1e}", f"{c['megabytes']:.2f}", f"{c['ms_per_image']:.2f}")
    console.print(table)
    if "web" in result:
        console.print(f"web page: {result['web']}; serve the folder (cd there, then `python3 -m http.server`) and "
                      "open http://localhost:8000/", markup=False)


@app.command("predict")
@one_line_errors
def predict_command(
    model: Annotated[Path, typer.Argument(help="A run folder, .keras, SavedModel folder, .tflite or .onnx.")],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    format_: Annotated[str, typer.Option("--format", "-f", help="table, csv or json (one object per line).")] = (
        "table"),
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes to show per image.")] = 1,
    batch: Annotated[int, typer.Option("--batch", "-b", help="Images decoded and predicted at a time.")] = 32,
    unknown: Annotated[bool, typer.Option(
        "--unknown/--no-unknown", help="With a run folder or .tflite: call images unlike the training images "
                                       "'unknown'.")] = True,
) -> None:
    """Classify images with any exported model; bad files are reported on their own line.

    Given a run folder or a .tflite export, each image also gets the run's unknown-input score, and is called
    "unknown" beyond its threshold (metrics.json["unknown"]); --no-unknown turns that off."""
    import csv as csv_lib
    import json

    from mobiletune.errors import UsageError
    from mobiletune.ship.predict import load_predictor, model_path, needs_tensorflow, predict_paths

    if format_ not in ("table", "csv", "json"):
        raise UsageError(f"--format {format_!r}: choose table, csv or json")
    if needs_tensorflow(model_path(model)):  # a missing model is refused before TensorFlow starts
        import_tensorflow()
    predictor = load_predictor(model)
    scoring = unknown and predictor.unknown_threshold is not None
    if unknown and not scoring and format_ == "table":  # every image gets a class: say so once, on stderr
        err_console.print(f"note: {model} has no unknown-input score; every image gets one of its classes",
                          markup=False)
    writer = csv_lib.writer(sys.stdout, lineterminator="\n")
    if format_ == "csv":
        writer.writerow(["path", *(["unknown", "unknown_score"] if scoring else []),
                         *[f"{k}{i + 1}" for i in range(top_k) for k in ("class", "p")], "error"])
    errors = 0
    for p in predict_paths(predictor, paths, batch=batch, top_k=top_k, unknown=unknown):
        errors += bool(p.error)
        score = [] if p.unknown_score is None else [p.unknown, f"{p.unknown_score:.6f}"]
        if format_ == "json":
            print(json.dumps({"path": p.path, "top": [{"class": c, "p": round(v, 6)} for c, v in p.top],
                              **({"unknown": p.unknown, "unknown_score": round(p.unknown_score, 6)}
                                 if p.unknown_score is not None else {}),
                              **({"error": p.error} if p.error else {})}), flush=True)
        elif format_ == "csv":
            top = [x for c, v in p.top for x in (c, f"{v:.6f}")]  # empty on an error: padded, so the message
            writer.writerow([p.path, *(score or ([""] * 2 if scoring else [])),  # lands under "error"
                             *top, *[""] * (2 * top_k - len(top)), p.error])
        else:
            shown = "  ".join(f"{c} {v:.3f}" for c, v in p.top) if p.top else f"error: {p.error}"
            if p.unknown:
                shown = f"unknown (score {p.unknown_score:.3f} > {predictor.unknown_threshold:.3f}; nearest: {shown})"
            print(f"{p.path}\t{shown}", flush=True)
    if errors:
        err_console.print(f"{errors} file(s) could not be read", markup=False)
        raise typer.Exit(1)


@app.command()
@one_line_errors
def fetch(
    name: Annotated[str, typer.Argument(help="Data set to download: cats-and-dogs (the tutorial's 2000/1000 set).")],
) -> None:
    """Download a demo data set (checksum verified) and print its folder."""
    from mobiletune.data.fetch import fetch_cats_and_dogs
    from mobiletune.errors import UsageError

    if name != "cats-and-dogs":
        raise UsageError(f"fetch {name!r}: unknown data set; available: cats-and-dogs")
    import_tensorflow()
    print(fetch_cats_and_dogs())


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())
