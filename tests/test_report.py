"""The reports: report.html in a real browser (Debian's Chromium, headless, via Playwright); the sweep summary."""

import shutil

from conftest import render_in_chromium, require_chromium
from mobiletune.report_html import build_report


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

    from mobiletune.model_card import model_card_markdown
    from mobiletune.report import mcnemar_sentence

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
