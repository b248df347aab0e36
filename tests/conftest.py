"""Shared fixtures: offline ImageNet weights, tiny real data sets, a tiny fast config.

Tests read ../shared/data in place and copy only the handful of files a test needs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOBILETUNE_SHARED", ROOT.parent / "shared"))
CATS_DOGS = SHARED / "data" / "cats_and_dogs_filtered"
FLOWERS = SHARED / "data" / "flowers_mini"


def _scratch(prefix: str) -> str:
    """A temporary folder removed when the test session ends: a full run's feature cache is ~400 MB, and
    left behind it filled the disk after a day of test runs."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# Keras reads KERAS_HOME when it is imported: install the offline weights before any test does.
if "KERAS_HOME" not in os.environ and (SHARED / "weights" / "install-into-keras-cache").exists():
    home = _scratch("keras-home-")
    subprocess.run([str(SHARED / "weights" / "install-into-keras-cache"), home], check=True, capture_output=True)
    os.environ["KERAS_HOME"] = home
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The feature cache of the tests stays out of the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = _scratch("mobiletune-test-cache-")

# Small enough to run a whole recipe in seconds, real enough to exercise every code path.
TINY = [
    "data.image_size=32",
    "data.batch_size=4",
    "phase1.epochs=1",
    "phase1.min_steps=0",  # epochs as given: the tiny runs check that things run, not how long to train
    "phase2.epochs=1",
    "phase1.lr=0.001",
]


def copy_images(src: Path, dst: Path, per_class: int, offset: int = 0) -> None:
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / class_dir.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(class_dir.iterdir())[offset : offset + per_class]:
            shutil.copy(f, dst / class_dir.name / f.name)


@pytest.fixture
def cats_dogs_tiny(tmp_path: Path) -> Path:
    """train/ 6+6 and validation/ 5+5 real cats-vs-dogs JPEGs."""
    root = tmp_path / "cats_dogs"
    copy_images(CATS_DOGS / "train", root / "train", 6)
    copy_images(CATS_DOGS / "validation", root / "validation", 5)
    return root


@pytest.fixture
def flowers_tiny(tmp_path: Path) -> Path:
    """5 class folders of 5 real flower photos each, no split folders."""
    root = tmp_path / "flowers"
    copy_images(FLOWERS, root, 5)
    return root


@pytest.fixture
def tiny_config():
    from mobiletune.config import load_config

    return load_config(overrides=TINY)


def _finished_run(factory, name: str, splits: dict[str, tuple[str, int, int]], overrides: list[str]):
    """A run of `overrides` on cats-vs-dogs photos, copied for each split from (folder, per class, offset)."""
    from mobiletune.config import load_config
    from mobiletune.training.run import train_and_evaluate

    root = factory.mktemp(name)
    for split, (folder, per_class, offset) in splits.items():
        copy_images(CATS_DOGS / folder, root / "data" / split, per_class, offset)
    return train_and_evaluate(load_config(overrides=overrides), root / "data", root / "run")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny run (train/ 6+6, validation/ 5+5 real photos), shared by read-only tests."""
    return _finished_run(tmp_path_factory, "tiny_run", {"train": ("train", 6, 0), "validation": ("validation", 5, 0)},
                         TINY)


# A run that has really learnt: 30 + 30 training photos, 20 + 20 for validation and 20 + 20 for test, at 128 px,
# with enough head steps to fit (10 epochs at lr 1e-3) and the seed's phase-2 rate (lr 1e-5). Its 40 test images
# make an accuracy mean something: a model at chance reaches 80% with probability 1e-4. About 15 s.
LEARNED = ["data.image_size=128", "data.batch_size=8", "phase1.epochs=10", "phase1.min_steps=0",
           "phase1.lr=0.001", "phase2.epochs=2", "phase2.lr_ratio=0.01"]


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    """A finished cats-vs-dogs run on 60/40/40 real photos (`LEARNED`), shared by tests that check results."""
    return _finished_run(tmp_path_factory, "learned_run", {"train": ("train", 30, 0),
                                                           "validation": ("validation", 20, 0),
                                                           "test": ("validation", 20, 100)}, LEARNED)


# .ci/run sets CI: there a missing browser or database fails the tests that need it, where elsewhere they skip.
IN_CI = bool(os.environ.get("CI"))


def require(what: str, present: bool, fix: str) -> None:
    """Go on when `what` is `present`; else skip the test, saying why and how to get it, or in CI fail it."""
    if present:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing in CI, which must run every test ({fix})")
    pytest.skip(f"needs {what} ({fix})")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> None:
    require("Debian's chromium", CHROMIUM is not None, "apt-get install chromium; .ci/run installs it")


def render_in_chromium(page_path: Path, widths=(390, 1280)) -> tuple[dict[int, list], dict[int, int], list[str]]:
    """Open a page in Debian's Chromium (headless, Playwright) at a phone's and a desktop's width.

    Returns each width's images as [alt, loaded, natural width], how far the page overflows the
    screen sideways, and every console or page error.
    """
    from playwright.sync_api import sync_playwright

    images, overflow, problems = {}, {}, []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        for width in widths:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            images[width] = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            overflow[width] = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        browser.close()
    return images, overflow, problems


def choice_in_trials_csv(path: Path, latency_column: str | None = None, budget: float | None = None) -> int:
    """The trial a sweep must put into best/, worked out from its trials.csv alone: the finished trial with the
    highest validation accuracy (within `budget` ms of `latency_column`, when given); ties go to the faster
    trial, then to the earlier one."""
    import csv

    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "COMPLETE"]
    latency = (lambda r: float(r[latency_column])) if latency_column else (lambda r: 0.0)
    if budget is not None:
        rows = [r for r in rows if latency(r) <= budget]
    return int(min(rows, key=lambda r: (-float(r["val_accuracy"]), latency(r), int(r["number"])))["number"])
