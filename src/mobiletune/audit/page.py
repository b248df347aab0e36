"""`audit.html`: the audit's findings on one self-contained page, thumbnails side by side.

Duplicate pairs show both images; each suspected label error shows its class and the class the
out-of-fold head prefers; each outlier its score. The most suspicious come first; the page stops
at `LIMIT` rows per issue (audit.csv has them all).
"""

from __future__ import annotations

import html
from pathlib import Path

from mobiletune import runfolder
from mobiletune.audit.checks import ISSUES, Finding
from mobiletune.report.html import CSS, thumbnail
from mobiletune.runfolder import write_text

# one finding (a pair, or a single suspect) per box; boxes flow across the page
EXTRA_CSS = (".findings{display:flex;flex-wrap:wrap;gap:18px}.findings .grid{border:1px solid #ddd;padding:6px}"
             "h1,p{overflow-wrap:anywhere}")  # long folder names wrap on a phone
LIMIT = 60  # rows per issue on the page: enough to act on, small enough to load on a phone
TITLES = {
    "exact_duplicate": "Exact duplicates (identical files)",
    "near_duplicate": "Near duplicates (resized, recompressed or slightly cropped copies)",
    "label_error": "Likely label errors",
    "outlier": "Off-topic images (outliers)",
}


def _figure(root: Path, path: str, caption: str) -> str:
    src = thumbnail(root / path)
    image = f'<img src="{src}" alt="{html.escape(path)}">' if src else "<p>(cannot be shown)</p>"
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _section(root: Path, issue: str, findings: list[Finding]) -> str:
    rows = [f for f in findings if f.issue == issue]
    out = [f"<h2>{TITLES[issue]}: {len(rows)}</h2>"]
    if not rows:
        return out[0] + '<p class="note">none found</p>'
    cells: list[str] = []
    for f in rows[:LIMIT]:
        head = f"{f.path} ({f.split}, {f.cls})"
        if f.other_path:
            figures = [_figure(root, f.path, head),
                       _figure(root, f.other_path, f"{f.other_path} (similarity {f.score:.3f})")]
        elif f.suggested_class:
            figures = [_figure(root, f.path, f"{head}: looks like {f.suggested_class}, score {f.score:.3f}")]
        else:
            figures = [_figure(root, f.path, f"{head}, score {f.score:.3f}")]
        cells.append(f'<div class="grid">{"".join(figures)}</div>')
    out.append(f'<div class="findings">{"".join(cells)}</div>')
    if len(rows) > LIMIT:
        out.append(f'<p class="note">{len(rows) - LIMIT} more in audit.csv</p>')
    return "\n".join(out)


def build_audit_page(out: Path, root: Path, findings: list[Finding], summary: dict) -> Path:
    """Write OUT/audit.html for the images under `root`."""
    leaks = (f"<p>{summary['leaks']} duplicate pair(s) cross train and validation/test: those held-out images "
             "are as good as seen in training.</p>") if summary["leaks"] else ""
    body = "\n".join(_section(root, issue, findings) for issue in ISSUES)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>mobiletune audit</title>"
            f"<style>{CSS}{EXTRA_CSS}</style></head><body><h1>Data audit of {html.escape(str(root.resolve()))}</h1>"
            f"{leaks}{body}</body></html>")
    path = out / runfolder.AUDIT_PAGE
    write_text(path, page)
    return path
