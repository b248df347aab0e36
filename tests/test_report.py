"""The reports: report.html in a real browser (Debian's Chromium, headless, via Playwright); the sweep summary."""

import shutil

from conftest import render_in_chromium, require_chromium
from mobiletune.report.html import build_report


def test_report_renders_without_errors(tiny_run, tmp_path):
    require_chromium()
    run = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, run)
    (run / "report.html").unlink()
    page_path = build_report(run)  # rebuilt from the folder alone
    html = page_path.read_text()
    assert "src=\"http" not in html and "McNemar" in html and "<h3>Audit</h3>" in html  # self-contained
    assert '<a href="model_card.md">' in html and "<h2>Unknown inputs</h2>" in html

    images, overflow, problems = render_in_chromium(page_path)
    for width in images:
        assert len(images[width]) >= 7  # curves x2, confusion x2, ROC, reliability, unknown (+ thumbnails)
        assert all(done and width_px > 0 for _, done, width_px in images[width]), images[width]
        assert overflow[width] <= 1, f"page wider than a {width}px screen by {overflow[width]}px"
    assert problems == []


def test_a_fine_tuning_that_made_the_model_worse_says_what_to_do(tiny_run, tmp_path):
    """On a small folder a high phase-2 learning rate can undo phase 1 (flowers_mini: 80% -> 40%): the
    console, summary.md and report.html say which model is better and what to change."""
    import json

    from mobiletune.report.model_card import model_card_markdown
    from mobiletune.report.summary import mcnemar_sentence

    worse = {"only_before_right": 10, "only_after_right": 2, "p_value": 0.0386}
    assert "the head alone, before_fine_tuning.keras, did better" in mcnemar_sentence(worse)
    for not_worse in ({**worse, "p_value": 0.2}, {"only_before_right": 2, "only_after_right": 10, "p_value": 0.0386}):
        assert "did better" not in mcnemar_sentence(not_worse)

    run = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "mcnemar": {**metrics["mcnemar"], **worse}}))
    assert "a lower phase2.lr_ratio or fewer phase2.epochs.</p>" in build_report(run).read_text()
    assert "did better" in model_card_markdown(run)
    (run / "metrics.json").write_text(json.dumps(metrics))  # as trained: fine-tuning did not make it worse
    page = build_report(run).read_text()
    assert "did better" not in page and "5%. </p>" not in page and "did better" not in model_card_markdown(run)


def test_one_results_table_in_every_report(tiny_run):
    """summary.md, the model card, report.html and the console show the same rows, each figure worked out from
    metrics.json here: accuracy and interval as percentages, the loss to four places."""
    import io
    import json

    from rich.console import Console

    from mobiletune.report.results import results_table
    from mobiletune.report.summary import print_results

    run = tiny_run.workdir
    metrics = json.loads((run / "metrics.json").read_text())
    rows = []
    for stage, label in (("before_fine_tuning", "before fine-tuning"), ("after_fine_tuning", "after fine-tuning")):
        test = metrics[stage]["test"]
        lo, hi = test["accuracy_ci95"]
        rows.append([label, f"{100 * test['accuracy']:.2f}%", f"{100 * lo:.1f}% to {100 * hi:.1f}%",
                     f"{test['loss']:.4f}", f"{100 * test['balanced_accuracy']:.2f}%"])
    table = results_table(metrics)
    assert [list(r[:5]) for r in table.rows] == rows and table.columns[:4] == ("stage", "accuracy", "95% interval",
                                                                                "loss")
    summary, card = (run / "summary.md").read_text(), (run / "model_card.md").read_text()
    page = (run / "report.html").read_text()
    console = Console(file=io.StringIO(), width=200)
    print_results(console, metrics)
    shown = console.file.getvalue()
    for row in rows:
        assert "| " + " | ".join(row[:4]) + " |" in summary
        assert "| " + " | ".join(row) + " |" in card
        assert "<tr>" + "".join(f"<td>{v}</td>" for v in row) in page
        assert all(v in shown for v in row[:4])


def test_a_metrics_file_damaged_by_hand_is_one_line(tiny_run, tmp_path):
    import json

    import pytest

    from mobiletune.errors import UsageError

    run = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["after_fine_tuning"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UsageError, match="metrics.json does not hold what a report needs .no 'after_fine_tuning'.; "
                                         "`mobiletune evaluate .*` writes it again"):
        build_report(run)


def test_a_schedule_without_phase_1_says_so():
    """A retraining (`--from`) skips phase 1: summary.md must not speak of its optimizer steps."""
    from mobiletune.config import load_config
    from mobiletune.report.summary import schedule_lines

    schedule = {"passes_per_epoch": 1, "phase1_steps_per_epoch": 3, "phase2_steps_per_epoch": 3}
    retraining = schedule_lines(load_config(overrides=["phase1.epochs=0", "phase1.min_steps=40"]),
                                {"schedule": schedule})[0]
    assert retraining.startswith("Schedule: the head is not trained on its own. Phase 1: none (phase1.epochs=0); "
                                 "phase 2: 10 epoch(s)") and "min_steps" not in retraining
    assert "at least phase1.min_steps=630" in schedule_lines(load_config(), {"schedule": schedule})[0]
