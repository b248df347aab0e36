"""The reports: report.html in a real browser (Debian's Chromium, headless, via Playwright); the sweep summary."""

import shutil

from conftest import needs_chromium, render_in_chromium
from mobiletune.report_html import build_report


@needs_chromium
def test_report_renders_without_errors(tiny_run, tmp_path):
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
