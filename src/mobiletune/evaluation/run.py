"""`mobiletune evaluate RUN [--data DIR]`: a finished run's models scored again, on its own test split or on a
new labelled folder (into a folder of its own), with the same statistics and files as the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobiletune.evaluation.statistics import compare_stages, predict_logits, probabilities, write_predictions


def default_folder(run: str | Path, data_dir: str | Path) -> Path:
    """Where `evaluate RUN --data DIR` writes without --out: RUN/evaluations/<DIR's name> (a labels CSV's stem)."""
    from mobiletune import runfolder

    data_dir = Path(data_dir).resolve()
    return Path(run) / runfolder.EVALUATIONS / (data_dir.stem if data_dir.is_file() else data_dir.name)


def evaluation_folder(run: str | Path, data_dir: str | Path | None, out: str | Path | None,
                      overwrite: bool) -> Path | None:
    """Where `evaluate RUN --data DIR` writes (None without `data_dir`: the run's own files are rebuilt), checked
    before any work: `out`, or the default folder, replaced when it holds an evaluation of the same images; one of
    other images there (setA/test and setB/test share a name) is kept unless `overwrite`."""
    from mobiletune import runfolder
    from mobiletune.errors import UsageError

    if data_dir is None:
        if out is not None:
            raise UsageError("--out: only with --data (without it the run's own files are rebuilt)")
        return None
    if out is not None and Path(out).resolve() == Path(run).resolve():
        raise UsageError(f"--out {out}: the run folder itself; its own files stay as they are: give another folder")
    if out is not None:
        return runfolder.check_out(out, overwrite=overwrite)
    out = default_folder(run, data_dir)
    earlier = out / runfolder.EVALUATION
    if earlier.is_file() and not overwrite:
        try:
            same = runfolder.read_json(earlier).get("data_dir") == str(Path(data_dir).resolve())
        except (UsageError, AttributeError):
            same = False
        if not same:
            raise UsageError(f"{out} holds the evaluation of other images; give --out, or --overwrite to replace it")
    return out


def evaluate_run(run: str | Path, data_dir: str | Path | None = None, out: str | Path | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Re-evaluate a finished run's two models (before and after fine-tuning); returns the before/after block.

    On the run's own test split by default: metrics.json, test_predictions.csv and the report are rebuilt in
    place. On every image of `data_dir`: into `out` (default RUN/evaluations/<data_dir's name>, which is replaced),
    evaluation.json and test_predictions.csv; the run's own files stay as they are, so its report, later
    evaluations and exports still read its own test split.
    """
    from mobiletune import runfolder
    from mobiletune.config import load_config
    from mobiletune.data import folders as data
    from mobiletune.data import pixels
    from mobiletune.evaluation import unknown
    from mobiletune.model.network import Classifier, load_model
    from mobiletune.report import html as report_html
    from mobiletune.report.model_card import write_model_card

    run = Path(run)
    metrics = runfolder.read_metrics(run)  # first: a clear error for a folder that is no run
    out = evaluation_folder(run, data_dir, out, overwrite)
    config = load_config(run / runfolder.CONFIG)
    images = data.load_test_images(run, data_dir, config.data)
    test = pixels.eval_batches(images, config.data.image_size, config.data.batch_size)
    before = probabilities(predict_logits(load_model(run / runfolder.MODEL_BEFORE), test)[0])
    detector, scores = unknown.load(run / runfolder.UNKNOWN), None
    # the fine-tuned model's one pass gives its logits and the features its unknown score reads
    features, logits = unknown.embed(Classifier(load_model(run / runfolder.MODEL)), images, ("test",), config,
                                     layers=detector.layers if detector else ())["test"]
    after = probabilities(logits)
    block = compare_stages(before, after, images.labels, images.classes)
    if detector is not None:
        scores = detector.scores(features, logits)
        block["unknown"] = detector.summary(scores)
    if out is not None:
        runfolder.make_folder(out)
        write_predictions(out / runfolder.PREDICTIONS, images.paths, images.labels, images.classes, before, after,
                          scores)
        runfolder.write_json(out / runfolder.EVALUATION, {
            "run": str(run.resolve()), "data_dir": str(Path(data_dir).resolve()), "classes": images.classes,
            "n_images": {"test": len(images.labels)}, **block})
        return block
    metrics.update(block)
    write_predictions(run / runfolder.PREDICTIONS, images.paths, images.labels, images.classes, before, after,
                      scores)
    runfolder.write_json(run / runfolder.METRICS, metrics)
    write_model_card(run)
    report_html.build_report(run)
    return block
