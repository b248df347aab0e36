"""The data audit: planted duplicates, label swaps and off-topic images are found; leaks are reported;
audit.csv closes the loop through --exclude."""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import CATS_DOGS, FLOWERS, TINY, render_in_chromium, require_chromium
from mobiletune import runfolder
from mobiletune.audit import checks as audit
from mobiletune.audit import scores
from mobiletune.cli import app
from mobiletune.config import load_config
from mobiletune.data import folders as data
from mobiletune.data.images import ImageSet
from mobiletune.data.manifest import read_manifest
from mobiletune.features import compute as features
from mobiletune.model.imagenet import top_for
from mobiletune.model.network import create_model

runner = CliRunner()


def plant(dst: Path) -> dict[str, list]:
    """A copy of cats_and_dogs_filtered with 20 label swaps, 10 near copies of training images placed in
    validation/ (resized to 60%, recompressed at JPEG quality 30, or cropped by 4% a side) and 5 flowers
    among the training cats."""
    shutil.copytree(CATS_DOGS, dst)
    rng = random.Random(0)
    planted: dict[str, list] = {"swap": [], "near": [], "offtopic": []}
    for cls, other in (("cats", "dogs"), ("dogs", "cats")):
        for f in rng.sample(sorted((dst / "train" / cls).iterdir()), 10):
            f.rename(dst / "train" / other / f"swapped_{f.name}")
            planted["swap"].append(f"train/{other}/swapped_{f.name}")
    originals = sorted((dst / "train" / "cats").glob("cat.*")) + sorted((dst / "train" / "dogs").glob("dog.*"))
    for k, f in enumerate(rng.sample(originals, 10)):
        image = Image.open(f).convert("RGB")
        w, h = image.size
        if k % 3 == 0:
            image = image.resize((int(w * 0.6), int(h * 0.6)))
        elif k % 3 == 1:
            image = image.crop((int(w * 0.04), int(h * 0.04), w - int(w * 0.04), h - int(h * 0.04)))
        image.save(dst / "validation" / f.parent.name / f"near_{f.name}", quality=30 if k % 3 == 2 else 75)
        planted["near"].append((f"validation/{f.parent.name}/near_{f.name}", str(f.relative_to(dst))))
    for f in rng.sample(sorted(FLOWERS.rglob("*.jpg")), 5):
        shutil.copy(f, dst / "train" / "cats" / f"flower_{f.name}")
        planted["offtopic"].append(f"train/cats/flower_{f.name}")
    return planted


def test_planted_problems_are_found(tmp_path):
    """The targets of the audit on a real 3,000-image folder at the default 160 px."""
    planted = plant(tmp_path / "data")
    config = load_config(overrides=[f"features.cache_dir={tmp_path / 'cache'}"])
    images = data.load_images(tmp_path / "data", config.data)
    classifier = create_model(config, 2)
    pooled, images = features.plain_pooled(classifier, images, config)
    found = [f for f in audit.run_audit(images, pooled, top=top_for(config, classifier.base)) if f.flagged]
    by = {issue: [f for f in found if f.issue == issue] for issue in audit.ISSUES}
    pairs = {frozenset((f.path, f.other_path)) for f in by["near_duplicate"] + by["exact_duplicate"]}
    assert sum(frozenset(p) in pairs for p in planted["near"]) >= 9  # >= 90% of planted copies
    swapped = {f.path: f.suggested_class for f in by["label_error"]}
    assert sum(p in swapped for p in planted["swap"]) >= 15  # >= 75% of swaps flagged
    assert sum(p in planted["swap"] for p in swapped) >= 0.6 * len(swapped)  # at >= 60% precision
    truth = {p: "cats" if "swapped_cat." in p else "dogs" for p in planted["swap"]}
    assert all(swapped[p] == truth[p] for p in planted["swap"] if p in swapped)  # the suggestion is the true class
    named = {f.path for f in found} | {f.other_path for f in found if f.other_path}
    assert sum(p in named for p in planted["offtopic"]) >= 4  # >= 80% of flowers flagged under some issue
    assert len(named - {p for pair in planted["near"] for p in pair} - set(planted["swap"])
               - set(planted["offtopic"])) <= 0.02 * len(images.paths)  # the rest: 1.6% on the clean set (docs)
    summary = audit.summary(images, found)
    assert summary["leaks"] >= 9  # the copies sit in validation/, their originals in train/
    print(json.dumps({k: v for k, v in summary.items() if k != "leaked_held_out"}))  # false positives, for the log


def test_duplicates_and_leaks_on_exact_copies(cats_dogs_tiny, tmp_path):
    original = sorted((cats_dogs_tiny / "train" / "cats").iterdir())[0]
    shutil.copy(original, cats_dogs_tiny / "validation" / "cats" / "copy.jpg")
    dog = sorted((cats_dogs_tiny / "train" / "dogs").iterdir())[0]
    shutil.copy(dog, cats_dogs_tiny / "train" / "cats" / "filed_as_a_cat.jpg")  # one file under two classes
    config = load_config(overrides=[*TINY, "data.image_size=64", f"features.cache_dir={tmp_path / 'cache'}"])
    images = data.load_images(cats_dogs_tiny, config.data)
    pooled, images = features.plain_pooled(create_model(config, 2), images, config)
    found = audit.run_audit(images, pooled, full=False)
    exact = {frozenset((f.path, f.other_path)): f for f in found if f.issue == "exact_duplicate"}
    assert set(exact) == {frozenset((f"train/cats/{original.name}", "validation/cats/copy.jpg")),
                          frozenset((f"train/dogs/{dog.name}", "train/cats/filed_as_a_cat.jpg"))}
    across = exact[frozenset((f"train/dogs/{dog.name}", "train/cats/filed_as_a_cat.jpg"))]
    assert {across.cls, across.suggested_class} == {"cats", "dogs"}  # the copy's class named beside its own
    assert not exact[frozenset((f"train/cats/{original.name}", "validation/cats/copy.jpg"))].suggested_class
    summary = audit.summary(images, found)
    assert summary["exact_duplicate"] == 2 and "validation/cats/copy.jpg" in summary["leaked_held_out"]
    assert summary["across_classes"] == 1 and summary["leaks"] == 1
    assert all(f.issue in ("exact_duplicate", "near_duplicate") for f in found)


def test_audit_command_writes_csv_and_page(cats_dogs_tiny, tmp_path):
    out = tmp_path / "audit"
    sets = [f"--set={s}" for s in [*TINY, "data.image_size=64"]]
    (cats_dogs_tiny / "train" / "cats" / "broken.png").write_bytes(b"not a picture")
    result = runner.invoke(app, ["audit", str(cats_dogs_tiny), "--out", str(out), *sets], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert runfolder.read_csv(out / "skipped.csv") == [{"path": "train/cats/broken.png",
                                                         "reason": "not an image PIL can read"}]
    assert "skipped: 1 file(s), each with its reason in" in result.output
    assert "label error" in result.output and "--exclude" in result.output
    assert "what ImageNet takes each class for" in result.output  # the kinds, with the 224-px top of the base
    rows = runfolder.read_csv(out / "audit.csv")
    assert list(rows[0]) == audit.COLUMNS if rows else (out / "audit.csv").read_text().startswith("path,split")
    assert all(r["issue"] in audit.ISSUES for r in rows)
    assert "<h1>Data audit of" in (out / "audit.html").read_text()
    again = runner.invoke(app, ["audit", str(cats_dogs_tiny), "--out", str(out), *sets])
    assert again.exit_code == 2 and "--overwrite" in again.output  # nothing a user made is overwritten
    missing = runner.invoke(app, ["audit", str(tmp_path / "nope"), "--out", str(tmp_path / "a2")])
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and "no such folder" in missing.output
    assert [r["flagged"] for r in rows] == sorted((r["flagged"] for r in rows), reverse=True)  # findings first
    per_check = {i: sum(r["issue"] == i and r["flagged"] == "false" for r in rows) for i in audit.ISSUES}
    assert max(per_check.values()) == 1  # then the next most suspicious 1% of 22 images (at least one) a check
    everything = runner.invoke(app, ["audit", str(cats_dogs_tiny), "--out", str(out), "--overwrite", "--all",
                                     *sets])
    assert everything.exit_code == 0, everything.output
    rows = runfolder.read_csv(out / "audit.csv")
    for issue in ("label_error", "outlier"):  # every image under each per-image check
        assert sorted(r["path"] for r in rows if r["issue"] == issue) == sorted(
            p.relative_to(cats_dogs_tiny).as_posix() for p in cats_dogs_tiny.rglob("*.jpg"))
    require_chromium()  # last: without it the checks above still ran, and the skip says what was left out
    images, overflow, problems = render_in_chromium(out / "audit.html")  # as a person sees it: phone, desktop
    assert problems == [] and all(v <= 1 for v in overflow.values())
    assert all(done and w > 0 for shown in images.values() for _, done, w in shown)


def test_the_page_downloads_the_ticked_images_as_an_exclude_list(cats_dogs_tiny, tmp_path):
    """In Chromium: tick two boxes on audit.html, download, and --exclude leaves exactly those two out."""
    from playwright.sync_api import sync_playwright

    from conftest import CHROMIUM

    out = tmp_path / "audit"
    sets = [f"--set={s}" for s in [*TINY, "data.image_size=64"]]
    assert runner.invoke(app, ["audit", str(cats_dogs_tiny), "--out", str(out), *sets]).exit_code == 0
    require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(accept_downloads=True)
        page.goto((out / "audit.html").as_uri())
        boxes = page.locator("input.pick")
        assert boxes.count() >= 2
        picked = [boxes.nth(i).get_attribute("value") for i in (0, boxes.count() - 1)]
        for i in (0, boxes.count() - 1):
            boxes.nth(i).check()
        assert page.locator("#ticked").inner_text() == str(len(set(picked)))
        with page.expect_download() as download:
            page.click("#download")
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        browser.close()
    assert saved.name == "exclude.txt"
    assert set(audit.read_exclusions(saved)) == set(picked)
    assert all((cats_dogs_tiny / path).is_file() for path in picked)  # paths relative to DATA_DIR, as --exclude


def test_exclude_leaves_files_out_and_lists_them(cats_dogs_tiny, tmp_path):
    dogs = sorted((cats_dogs_tiny / "train" / "dogs").iterdir())
    victims = [p.relative_to(cats_dogs_tiny).as_posix() for p in dogs[:2]]
    csv_path = tmp_path / "audit.csv"
    runfolder.write_csv(csv_path, audit.COLUMNS, [[victims[0], "train", "dogs", "label_error", 0.9, "cats", "", "true"],
                                                  [dogs[2].relative_to(cats_dogs_tiny).as_posix(), "train", "dogs",
                                                   "label_error", 0.4, "cats", "", "false"]])  # to review only
    listing = tmp_path / "list.txt"
    listing.write_text(f"# from a notebook\n{victims[1]}\n")
    out = tmp_path / "run"
    args = ["train", str(cats_dogs_tiny), "--out", str(out), "--exclude", str(csv_path), "--quiet",
            *[f"--set={s}" for s in TINY]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    skipped = {r["path"]: r["reason"] for r in runfolder.read_csv(out / "skipped.csv")}
    assert skipped == {victims[0]: "excluded (label_error, audit.csv)"}
    assert victims[0] not in {r["path"] for r in read_manifest(out / "split.csv")}
    assert audit.read_exclusions(listing) == {victims[1]: "excluded (listed in list.txt)"}
    latin = tmp_path / "latin.txt"  # a file name that is not UTF-8, as an audit.csv of that folder names it
    latin.write_bytes(b"cats/caf\xe9.jpg\n")
    assert audit.read_exclusions(latin) == {os.fsdecode(b"cats/caf\xe9.jpg"): "excluded (listed in latin.txt)"}
    # a list naming a file by its absolute path, and one that is not there: the first left out, the second a
    # reported skip, neither silently ignored
    listing.write_text(f"{cats_dogs_tiny / victims[1]}\ntrain/dogs/no_such.jpg\n{victims[0].replace('/', chr(92))}\n")
    images = data.load_images(cats_dogs_tiny, load_config(overrides=TINY).data,
                              exclude=audit.read_exclusions(listing))
    assert victims[1] not in images.paths and victims[0] not in images.paths  # the second, from Windows
    assert {s.path: s.reason for s in images.skipped} == {
        victims[0]: "excluded (listed in list.txt)", victims[1]: "excluded (listed in list.txt)",
        "train/dogs/no_such.jpg": "listed in --exclude, but no such image here (excluded (listed in list.txt))"}
    bad = runner.invoke(app, ["train", str(cats_dogs_tiny), "--out", str(tmp_path / "r2"), "--exclude",
                              str(tmp_path / "none.csv")])
    assert bad.exit_code == 2 and "data.exclude" in bad.output


@pytest.mark.parametrize("level", ["none", "duplicates", "full"])
def test_every_run_reports_its_audit(cats_dogs_tiny, tmp_path, level):
    from mobiletune.training.run import train_and_evaluate

    config = load_config(overrides=[*TINY, f"data.audit={level}"])
    metrics = train_and_evaluate(config, cats_dogs_tiny, tmp_path / "run").metrics
    if level == "none":
        assert metrics["audit"] is None and not (tmp_path / "run" / "audit.csv").exists()
        return
    assert set(audit.ISSUES) <= set(metrics["audit"]) and "test_without_leaks" in metrics["audit"]
    issues = {r["issue"] for r in runfolder.read_csv(tmp_path / "run" / "audit.csv")}
    assert issues <= ({"exact_duplicate", "near_duplicate"} if level == "duplicates" else set(audit.ISSUES))
    # --audit's findings can be ticked on the page, as `mobiletune audit`'s; the cheap default check writes none
    assert (tmp_path / "run" / "audit.html").exists() == (level == "full")


@pytest.mark.parametrize("dedupe", [True, False])
def test_near_copies_stay_in_one_split_when_mobiletune_splits(flowers_tiny, tmp_path, dedupe):
    """80%-size copies of flowers: with data.dedupe each lands in its original's split; the manifest and the
    audit agree (no leak left), and a rerun (--resume scans the same way) makes the same split."""
    from mobiletune.training.run import train_and_evaluate

    originals = [sorted((flowers_tiny / c).iterdir())[i] for i, c in enumerate(["daisy", "roses", "tulips"])]
    for f in originals:
        image = Image.open(f)
        image.resize((image.width * 4 // 5, image.height * 4 // 5)).save(f.with_name(f"copy_{f.name}"), quality=75)
    config = load_config(overrides=[*TINY, "data.image_size=128", f"data.dedupe={str(dedupe).lower()}"])
    metrics = train_and_evaluate(config, flowers_tiny, tmp_path / "run").metrics
    split = {r["path"]: r["split"] for r in read_manifest(tmp_path / "run" / "split.csv")}
    pairs = [(f.relative_to(flowers_tiny).as_posix(), f"{f.parent.name}/copy_{f.name}") for f in originals]
    found = {(r["other_path"], r["path"]) for r in runfolder.read_csv(tmp_path / "run" / "audit.csv")
             if r["issue"] == "near_duplicate" and r["flagged"] == "true"}
    assert all(p in found or p[::-1] in found for p in pairs)  # the audit sees every copy at 128 px
    crossing = sum((split[a] == "train") != (split[b] == "train") for a, b in pairs)
    assert metrics["audit"]["leaks"] >= crossing
    if not dedupe:
        assert crossing > 0  # without it this seed splits a pair: the case the other run must prevent
    if dedupe:
        assert crossing == 0 and all(split[a] == split[b] for a, b in pairs)
        train_and_evaluate(config, flowers_tiny, tmp_path / "again")  # a rerun (or --resume) splits the same way
        assert read_manifest(tmp_path / "again" / "split.csv") == read_manifest(
            tmp_path / "run" / "split.csv")


def test_a_pair_is_found_from_either_side_of_the_neighbour_lists():
    """k-nearest neighbours are not symmetric: image 0 lists image 1 while image 1's list is full of others."""
    import numpy as np

    from mobiletune.data.images import ImageSet

    images = ImageSet(root=Path("."), classes=["a"], paths=["p0", "p1", "p2"], labels=np.zeros(3, np.int32),
                      splits=np.array(["train", "test", "train"]), hashes=["h0", "h1", "h2"])
    near = (np.array([[1.0, 0.95], [1.0, 0.99], [1.0, 0.99]]), np.array([[0, 1], [1, 2], [2, 1]]))
    found = audit.duplicates(images, near)
    assert {(f.path, f.other_path) for f in found} == {("p1", "p0"), ("p2", "p1")}


def _audit(root: Path, config) -> tuple[ImageSet, list, "np.ndarray", tuple]:
    """The images, the flagged rows, the features and the base's ImageNet top."""
    images = data.load_images(root, config.data)
    classifier = create_model(config, 2)
    pooled, images = features.plain_pooled(classifier, images, config)
    top = top_for(config, classifier.base)
    return images, [f for f in audit.run_audit(images, pooled, top=top) if f.flagged], pooled, top


def test_a_small_folder_40_per_class_clean_then_planted(tmp_path):
    """A user-sized folder (40 training and 10 validation photos per class at 160 px): on the clean copy at most
    1% of images is flagged; then 3 near copies (resized to 60%, cropped 4% a side, JPEG quality 30), 2 swaps
    each way and 2 flower photos among the cats are found."""
    from conftest import copy_images

    root = tmp_path / "data"
    copy_images(CATS_DOGS / "train", root / "train", 40)
    copy_images(CATS_DOGS / "validation", root / "validation", 10)
    config = load_config(overrides=[f"features.cache_dir={tmp_path / 'cache'}"])
    images, clean, _, _ = _audit(root, config)
    assert len(images.paths) == 100 and len({f.path for f in clean}) <= 1, [(f.path, f.issue) for f in clean]

    rng = random.Random(0)
    swaps = {}
    for cls, other in (("cats", "dogs"), ("dogs", "cats")):
        for f in rng.sample(sorted((root / "train" / cls).iterdir()), 2):
            f.rename(root / "train" / other / f"swapped_{f.name}")
            swaps[f"train/{other}/swapped_{f.name}"] = cls
    originals = sorted((root / "train").rglob("cat.*")) + sorted((root / "train").rglob("dog.*"))
    copies = []
    for k, f in enumerate(rng.sample(originals, 3)):
        image = Image.open(f).convert("RGB")
        w, h = image.size
        image = [image.resize((w * 3 // 5, h * 3 // 5)), image.crop((w // 25, h // 25, w - w // 25, h - h // 25)),
                 image][k]
        image.save(root / "validation" / f.parent.name / f"near_{f.name}", quality=[75, 75, 30][k])
        copies.append(frozenset((f"validation/{f.parent.name}/near_{f.name}", f.relative_to(root).as_posix())))
    flowers = []
    for f in rng.sample(sorted(FLOWERS.rglob("*.jpg")), 2):
        shutil.copy(f, root / "train" / "cats" / f"flower_{f.name}")
        flowers.append(f"train/cats/flower_{f.name}")

    # and one copy as a careless re-upload makes it: a tenth cropped a side, halved, JPEG 30 (0.6-0.9 cosine)
    f = rng.choice([o for o in originals if not any(o.relative_to(root).as_posix() in c for c in copies)])
    _hard_copy(Image.open(f)).save(root / "validation" / f.parent.name / f"hard_{f.name}", quality=30)
    copies.append(frozenset((f"validation/{f.parent.name}/hard_{f.name}", f.relative_to(root).as_posix())))

    images, found, pooled, top = _audit(root, config)
    pairs = {frozenset((f.path, f.other_path)) for f in found if f.issue in ("near_duplicate", "exact_duplicate")}
    assert all(c in pairs for c in copies) and len(pairs) == len(copies)  # every copy, and nothing else
    wrong = {f.path: f.suggested_class for f in found if f.issue == "label_error"}
    # flagged, with the true class: 1 to 4 of 4 (mean 3) over 6 plantings of this size (docs/testing.md)
    assert sum(wrong.get(p) == truth for p, truth in swaps.items()) >= 2, wrong
    assert sum(p in swaps or p in flowers for p in wrong) >= 0.5 * len(wrong)  # precision
    # the off-topic score ranks both flowers in the first 3 of 105 photos, among planted images only (a cat filed
    # under dogs is no dog either), and flags them (its recall by size: docs/audit.md)
    ranked = [images.paths[i] for i in np.argsort(-scores.offtopic_scores(pooled, images.labels, top))]
    assert set(flowers) <= set(ranked[:3]) and all(p in swaps or p in flowers for p in ranked[:4]), ranked[:5]
    kinds = scores.class_kinds(pooled, images.labels, top)  # what the flowers lack
    assert kinds[images.classes.index("dogs")] == "dog", kinds
    assert kinds[images.classes.index("cats")] in ("carnivore", "feline", "cat", "domestic_cat"), kinds
    assert set(flowers) <= {f.path for f in found if f.issue == "outlier"}
    planted = set(swaps) | set(flowers) | {p for c in copies for p in c}
    assert len({f.path for f in found} - planted) <= 1  # false positives stay at the clean set's level


def _hard_copy(image: Image.Image, crop: float = 0.1, scale: float = 0.5) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    image = image.crop((int(w * crop), int(h * crop * 0.8), w - int(w * crop * 0.9), h - int(h * crop)))
    return image.resize((int(image.width * scale), int(image.height * scale)))


def test_keypoints_tell_a_shrunk_recompressed_copy_from_look_alike_photos(tmp_path, monkeypatch):
    """Copies cropped 8-12% a side, shrunk to 40-50% (one stretched) and saved at JPEG 25-30 match their originals,
    and a mirrored copy; no two of 12 distinct cats do, straight or mirrored, nor the two closest
    look-alikes of the shared set (two black cats face-on, 12 matches, two tabbies 7: SAME_PHOTO is 20); an
    unreadable file matches nothing. The counts recorded in the file index are reused."""
    from mobiletune.audit import matching
    from mobiletune.data.scan import FileIndex

    look_alikes = ["validation/cats/cat.2149.jpg", "validation/cats/cat.2197.jpg", "train/cats/cat.301.jpg",
                   "train/cats/cat.981.jpg"]
    originals = look_alikes + [f"train/cats/cat.{k}.jpg" for k in range(8)]
    for k, name in enumerate(originals[4:10]):
        copy = _hard_copy(Image.open(CATS_DOGS / name), crop=0.08 + 0.01 * (k % 5), scale=0.4 + 0.02 * k)
        copy = copy.resize((copy.width, copy.height * 4 // 5)) if k == 5 else copy
        copy.save(tmp_path / f"copy{k}.jpg", quality=25 + k)
    _hard_copy(Image.open(CATS_DOGS / originals[10]), 0.04, 0.8).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        tmp_path / "copy6.jpg", quality=50)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    paths = [str(CATS_DOGS / p) for p in originals] + [str(tmp_path / f"copy{k}.jpg") for k in range(7)]
    images = ImageSet(root=Path("/"), classes=["cats"], paths=[*paths, str(tmp_path / "broken.jpg")],
                      labels=np.zeros(len(paths) + 1, np.int32), splits=np.array(["train"] * (len(paths) + 1)),
                      hashes=[hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths] + ["x"])
    copies = [(4 + k, 12 + k) for k in range(6)]
    distinct = [(a, b) for a in range(12) for b in range(a + 1, 12)]
    found = matching.same_photo(images, [*copies, *distinct, (10, 18), (0, 19), (19, 4)])
    assert [(a, b) for a, b, _ in found] == [*copies, (10, 18)], found
    straight = matching._matches(matching._keypoints(images, 10), matching._keypoints(images, 18))
    assert straight < matching.SAME_PHOTO  # a mirrored copy's keypoints match only mirrored
    monkeypatch.setattr(matching, "BLOCK", 3)  # pairs taken a few images at a time find the same
    asked = [*copies, (0, 1), (18, 10)]  # (18, 10): the same two files, asked the other way round
    index = FileIndex(tmp_path / "index.sqlite")
    again = matching.same_photo(images, asked, index=index)
    assert [(a, b, n) for a, b, n in again] == [*found[:6], (18, 10, found[6][2])]
    # a grown folder's run reads the counts of the pairs it has seen, and opens no image for them
    monkeypatch.setattr(matching, "_keypoints", lambda *a: pytest.fail("a recorded pair was matched again"))
    assert matching.same_photo(images, asked, index=index) == again


def test_the_label_probe_takes_a_4_image_class_among_1400_and_skips_a_1_image_one():
    """C is chosen on a subsample of a large set: a small class keeps every image there (a proportional share of
    4 could be none, and the folds need two); a class of one image gets no row rather than stopping the check."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [700, 700, 4, 1])
    pooled = np.abs(rng.normal(size=(4, 64))[labels] + 0.3 * rng.normal(size=(len(labels), 64)))
    probs, _ = scores.out_of_fold_probabilities(pooled, labels)
    assert np.isnan(probs[labels == 3]).all() and np.isfinite(probs[labels < 3]).all()
    assert (probs[labels < 3].argmax(1) == labels[labels < 3]).mean() > 0.95
    assert not scores.label_issue_mask(labels, probs)[labels < 2].any()  # clean, well separated classes


def test_off_topic_scores_stay_finite_when_most_images_are_copies_of_one():
    """30 exact copies of one photo among 40: their distances to the folder and to the class are all equal, over
    half the values of each view, so the MAD is 0; without a stand-in every other score would be ~1e20 robust
    deviations."""
    rng = np.random.default_rng(0)
    pooled = np.abs(np.r_[np.repeat(rng.normal(size=(1, 32)), 30, axis=0), rng.normal(size=(10, 32))])
    labels = np.r_[np.zeros(30, int), np.arange(10) % 2]
    values = scores.offtopic_scores(pooled, labels)
    assert np.isfinite(values).all() and values.max() < 20 and np.ptp(values[:30]) == 0
    assert np.isnan(scores.offtopic_scores(pooled[:3], np.arange(3))).all()  # no class to compare with


def test_the_imagenet_hierarchy_names_every_class_as_the_shared_labels_do():
    """Each ImageNet class's deepest WordNet noun is the class itself: its word is in the label of that output
    (../shared/weights/imagenet_labels.txt, 1,000 outputs after "background"), so the rows are in output order."""
    from conftest import SHARED
    from mobiletune.model.imagenet import hierarchy

    nouns = hierarchy()
    labels = (SHARED / "weights" / "imagenet_labels.txt").read_text().splitlines()[1:]
    assert nouns.members.shape[0] == len(labels) == 1000
    deepest = [nouns.names[max(np.flatnonzero(row), key=lambda k: nouns.depths[k])] for row in nouns.members]
    assert all(name.replace("_", " ").lower() in label.lower() for name, label in zip(deepest, labels, strict=True))
    assert (nouns.members[:, nouns.names.index("entity")] == 1).all()


def test_a_class_kind_is_the_deepest_noun_that_holds_its_belief_and_a_daisy_filed_there_lacks_it():
    """Nine photos MobileNetV2 calls tabby or Siamese cats (0.9) and one it calls a daisy: the kind is
    "domestic_cat" (81% of the mean belief; "tabby" alone holds only 45%), the daisy lies 2.3 tenfolds below
    KIND_BELIEF in it (counted up to KIND_DECADES), the cats none; a folder ImageNet has no class for gets a kind
    so broad that nothing lacks it."""
    from mobiletune.model.imagenet import hierarchy

    tabby, siamese, daisy = 281, 284, 985
    probs = np.full((10, 1000), 0.1 / 999)
    for row, cls in enumerate([tabby, siamese] * 4 + [tabby, daisy]):
        probs[row, cls] = 0.9
    probs /= probs.sum(axis=1, keepdims=True)
    deficit, kind = scores.kind_deficit(probs, hierarchy())
    assert kind == "domestic_cat"
    assert deficit[:9].max() == 0 and deficit[9] == pytest.approx(np.log10(0.1 / (5 * 0.1 / 999)), abs=0.05)
    spread = np.random.default_rng(0).dirichlet(np.full(1000, 0.05), size=30)  # beliefs over everything
    deficit, kind = scores.kind_deficit(spread, hierarchy())
    assert hierarchy().depths[hierarchy().names.index(kind)] <= 3 and deficit.max() < 1


def test_where_a_class_has_no_kind_a_photo_of_another_kind_is_scored_by_the_contrast():
    """Twenty photos MobileNetV2 spreads over many classes (as it does roses: their kind is "whole") and a tabby at
    0.9: the rest of the class holds 1e-4 of "tabby", so the cat lies ~3.5 tenfolds beyond it, ~0.5 beyond
    CONTRAST_FROM; the spread photos none. In a class of cats with a kind, the lack is the deficit alone: a
    Siamese among tabbies has no contrast to count."""
    from mobiletune.model.imagenet import hierarchy

    tabby, siamese = 281, 284
    spread = np.random.default_rng(0).dirichlet(np.full(1000, 0.05), size=20)
    spread[:, tabby] = 1e-4
    probs = np.vstack([spread / spread.sum(axis=1, keepdims=True), np.full((1, 1000), 0.1 / 999)])
    probs[-1, tabby] = 0.9
    contrast = scores.kind_contrast(probs, hierarchy())
    assert contrast[:-1].max() == 0 and contrast[-1] > 0.3
    lack = scores._kind_lack(probs, hierarchy())
    assert lack[-1] == pytest.approx(max(contrast[-1], scores.kind_deficit(probs, hierarchy())[0][-1]))
    cats = np.full((10, 1000), 0.1 / 999)
    for row, cls in enumerate([tabby] * 9 + [siamese]):
        cats[row, cls] = 0.9
    assert np.array_equal(scores._kind_lack(cats, hierarchy()), scores.kind_deficit(cats, hierarchy())[0])
    assert scores.kind_contrast(cats, hierarchy())[-1] > 0  # the Siamese stands out, but the class has a kind


def test_the_contrast_in_chunks_equals_the_contrast_at_once(monkeypatch):
    from mobiletune.model.imagenet import hierarchy

    probs = np.random.default_rng(1).dirichlet(np.full(1000, 0.02), size=30) * 1e-3
    for row, cls in ((3, 281), (11, 985), (20, 409)):  # three that stand out: a tabby, a daisy, a clock
        probs[row, cls] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    whole = scores.kind_contrast(probs, hierarchy())
    monkeypatch.setattr(scores, "CHUNK", 7)
    assert whole.max() > 0 and np.allclose(scores.kind_contrast(probs, hierarchy()), whole)


@pytest.mark.parametrize(("n", "blanks"), [(300, 7), (12, 5), (3, 3), (40, 0)])
def test_the_neighbour_search_keeps_blank_images_apart(n, blanks):
    """The search lists the neighbours and similarities of scikit-learn's cosine metric, and a blank image (all-zero
    features) is alike to nothing but itself: two blank images are no copies of each other. A Euclidean search on
    unit rows (the same neighbours otherwise) made them identical, and grouped them as near copies; measured no
    faster on float32 features (2.8 against 2.7 s for 10,000 images)."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(n)
    pooled = np.abs(rng.normal(size=(n, 16))).astype(np.float32)
    pooled[rng.choice(n, blanks, replace=False)] = 0
    if n > blanks + 1:
        pooled[np.flatnonzero(pooled.any(axis=1))[1]] = pooled[np.flatnonzero(pooled.any(axis=1))[0]]  # a copy
    similarities, indices = audit.nearest(pooled)
    distances, expected = NearestNeighbors(n_neighbors=similarities.shape[1], metric="cosine").fit(pooled).kneighbors(
        pooled)
    assert np.allclose(similarities, 1.0 - distances, atol=1e-5)
    live = np.flatnonzero(pooled.any(axis=1))
    assert all(set(indices[i]) == set(expected[i]) for i in live)  # random rows: no ties among the live ones
    for i in np.flatnonzero(~pooled.any(axis=1)):
        assert indices[i, 0] == i and similarities[i, 0] == 1 and (similarities[i, 1:] == 0).all()
        assert len(set(indices[i])) == len(indices[i])
