"""`mobiletune evaluate RUN [DATA_DIR]`: a finished run's models scored again, on its own test split or on a
new labelled folder, with the same statistics and files as the run."""

from __future__ import annotations

from typing import Any

from mobiletune.evaluation.statistics import compare_stages, predict_logits, probabilities, write_predictions


def evaluate_run(run, data_dir=None) -> dict[str, Any]:
    """Re-evaluate a finished run's two models (before and after fine-tuning) and rebuild its report.

    On the run's own test split by default, or on every image of `data_dir`. Updates
    metrics.json and test_predictions.csv in place; returns the new before/after block.
    """
    from pathlib import Path

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
    if data_dir is not None:
        metrics.update(data_dir=str(Path(data_dir).resolve()), n_images={"test": len(images.labels)})
    metrics.update(block)
    if detector is not None:
        scores = detector.scores(features, logits)
        metrics["unknown"] = detector.summary(scores)
    write_predictions(run / runfolder.PREDICTIONS, images.paths, images.labels, images.classes, before, after,
                      scores)
    runfolder.write_json(run / runfolder.METRICS, metrics)
    write_model_card(run)
    report_html.build_report(run)
    return block
