"""`audit.html`: the audit on one self-contained page, thumbnails side by side, and an exclude list to download.

Each check shows its findings (flagged), then the images to review (the next most suspicious).
Duplicate pairs show both images; each label row shows its class and the class the out-of-fold
probe prefers; each outlier its score. Every box has a tick box: "Download exclude list" saves
the ticked paths as a text file that `--exclude` reads. The page stops at `LIMIT` boxes per
check and group (audit.csv has every row).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from mobiletune import runfolder
from mobiletune.audit.checks import ISSUES, Finding
from mobiletune.report.html import CSS, thumbnail
from mobiletune.runfolder import write_text

# one finding (a pair, or a single suspect) per box; boxes flow across the page
EXTRA_CSS = (".findings{display:flex;flex-wrap:wrap;gap:18px}.findings .grid{border:1px solid #ddd;padding:6px}"
             "h1,p{overflow-wrap:anywhere}.pick{display:block;font-size:.85em}"  # long folder names wrap on a phone
             ".bar{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd}")
LIMIT = 60  # boxes per check and group on the page: enough to act on, small enough to load on a phone
EXCLUDE_FILE = "exclude.txt"  # the download's name; `mobiletune train DATA_DIR --exclude exclude.txt`
TITLES = {
    "exact_duplicate": "Exact duplicates (identical files)",
    "near_duplicate": "Near duplicates (resized, recompressed or slightly cropped copies)",
    "label_error": "Likely label errors",
    "outlier": "Off-topic images (outliers)",
}
# The ticked boxes' paths, one a line, as a file: a Blob and a link's download attribute, no server.
SCRIPT = """
const picks = () => [...document.querySelectorAll('input.pick:checked')].map(b => b.value);
function count() { document.getElementById('ticked').textContent = new Set(picks()).size; }
function download() {
  const lines = [HEADER, ...new Set(picks())];
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([lines.join('\\n') + '\\n'], {type: 'text/plain'}));
  link.download = FILE;
  document.body.appendChild(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 0);
}
document.addEventListener('change', count);
"""


def _figure(root: Path, path: str, caption: str) -> str:
    src = thumbnail(root / path)
    image = f'<img src="{src}" alt="{html.escape(path)}">' if src else "<p>(cannot be shown)</p>"
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _box(root: Path, f: Finding) -> str:
    head = f"{f.path} ({f.split}, {f.cls})"
    if f.other_path:
        figures = [_figure(root, f.path, head),
                   _figure(root, f.other_path, f"{f.other_path} (similarity {f.score:.3f}"
                                               + (f"; filed as {f.suggested_class})" if f.suggested_class else ")"))]
    elif f.suggested_class:
        figures = [_figure(root, f.path, f"{head}: looks like {f.suggested_class}, score {f.score:.3f}")]
    else:
        figures = [_figure(root, f.path, f"{head}, score {f.score:.3f}")]
    pick = f'<label class="pick"><input type="checkbox" class="pick" value="{html.escape(f.path)}"> exclude</label>'
    return f'<div class="grid">{"".join(figures)}{pick}</div>'


def _group(root: Path, rows: list[Finding], title: str, empty: str) -> str:
    out = [f"<h3>{title}: {len(rows)}</h3>"]
    if not rows:
        return out[0] + f'<p class="note">{empty}</p>'
    out.append(f'<div class="findings">{"".join(_box(root, f) for f in rows[:LIMIT])}</div>')
    if len(rows) > LIMIT:
        out.append(f'<p class="note">{len(rows) - LIMIT} more in audit.csv</p>')
    return "\n".join(out)


def _kinds(kinds: dict[str, str]) -> str:
    """What MobileNetV2's ImageNet top takes each class for: an off-topic image has little belief in it."""
    named = "; ".join(f"{html.escape(cls)}: {html.escape(kind)}" for cls, kind in kinds.items())
    return (f'<p class="note">What ImageNet takes each class for (the deepest WordNet noun holding most of its '
            f"images' belief): {named}. An image with little belief in its class's kind scores higher.</p>"
            if kinds else "")


def _section(root: Path, issue: str, findings: list[Finding], kinds: dict[str, str]) -> str:
    rows = [f for f in findings if f.issue == issue]
    flagged = [f for f in rows if f.flagged]
    return "\n".join([f"<h2>{TITLES[issue]}: {len(flagged)}</h2>", *([_kinds(kinds)] if issue == "outlier" else []),
                      _group(root, flagged, "Flagged", "none found"),
                      *([_group(root, [f for f in rows if not f.flagged], "Next most suspicious, to review", "")]
                        if len(rows) > len(flagged) else [])])


def build_audit_page(out: Path, root: Path, findings: list[Finding], summary: dict,
                     kinds: dict[str, str] | None = None) -> Path:
    """Write OUT/audit.html for the images under `root`; `kinds`: {class: its ImageNet kind}, where known."""
    leaks = (f"<p>{summary['leaks']} duplicate pair(s) cross train and validation/test: those held-out images "
             "are as good as seen in training.</p>") if summary["leaks"] else ""
    if summary.get("across_classes"):
        leaks += (f"<p>{summary['across_classes']} duplicate pair(s) are filed under two classes: at most one of "
                  "each pair has the right label.</p>")
    header = f"# mobiletune audit of {root.resolve()}: ticked to leave out (mobiletune train DATA_DIR --exclude FILE)"
    # "<" as \u003c: a folder named "</script>" or "<!--" stays text inside the script
    constants = f"const HEADER = {json.dumps(header)}, FILE = {json.dumps(EXCLUDE_FILE)};".replace("<", "\\u003c")
    script = constants + SCRIPT
    bar = ('<div class="bar"><button id="download" onclick="download()">Download exclude list</button> '
           '<span id="ticked">0</span> ticked; give the file to <code>--exclude</code></div>')
    body = "\n".join(_section(root, issue, findings, kinds or {}) for issue in ISSUES)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>mobiletune audit</title>"
            f"<style>{CSS}{EXTRA_CSS}</style><script>{script}</script></head><body>"
            f"<h1>Data audit of {html.escape(str(root.resolve()))}</h1>{leaks}{bar}{body}</body></html>")
    path = out / runfolder.AUDIT_PAGE
    write_text(path, page)
    return path
