"""The model in a browser: a static folder with a page that classifies the images a user drops or picks, through
MediaPipe Tasks for the web (`@mediapipe/tasks-vision` from npm) and the run's own .tflite file.

Everything the page needs is in the folder, wasm included: no CDN. The npm package is downloaded once from the
registry and verified against its published sha512, or taken from `MOBILETUNE_TASKS_VISION` (a tarball from
`npm pack @mediapipe/tasks-vision@VERSION`, or its unpacked folder) where there is no internet.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import shutil
import tarfile
import urllib.request
from importlib import resources
from pathlib import Path

from mobiletune import runfolder
from mobiletune.errors import ExportError
from mobiletune.features.cache import default_cache_dir
from mobiletune.ship.tflite_metadata import ModelInfo

__all__ = ["TASKS_VISION_VERSION", "tasks_vision_files", "write_web"]

TASKS_VISION_VERSION = "1.1.0"
TASKS_VISION_URL = f"https://registry.npmjs.org/@mediapipe/tasks-vision/-/tasks-vision-{TASKS_VISION_VERSION}.tgz"
# npm's published integrity of that tarball (`npm view @mediapipe/tasks-vision@1.1.0 dist.integrity`)
TASKS_VISION_SHA512 = "ZJqh0wMKOINorfSffvDAxzyO1//c+FiG3IkzOdNDnLqvBB3DbMfj0bB/tys2SNf9S914sgoIbIpF4HTOi336cg=="
TASKS_VISION_ENV = "MOBILETUNE_TASKS_VISION"
# the classic-script bundle (a global `Vision`: no module MIME types for a server to get wrong) and the wasm
# builds it picks from: with SIMD, and without for browsers that lack it
PACKAGE_FILES = ("vision_bundle.js", "wasm/vision_wasm_internal.js", "wasm/vision_wasm_internal.wasm",
                 "wasm/vision_wasm_nosimd_internal.js", "wasm/vision_wasm_nosimd_internal.wasm")
MODEL_FILE, PAGE = "model.tflite", "index.html"


def _verified(data: bytes, origin: str) -> bytes:
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != TASKS_VISION_SHA512:
        raise ExportError(f"{origin}: not @mediapipe/tasks-vision {TASKS_VISION_VERSION} (sha512 differs); "
                          f"get it with `npm pack @mediapipe/tasks-vision@{TASKS_VISION_VERSION}`")
    return data


def _tarball() -> bytes:
    """The npm tarball: from the cache, else downloaded from the registry and cached."""
    cached = default_cache_dir() / "npm" / f"tasks-vision-{TASKS_VISION_VERSION}.tgz"
    if cached.is_file():
        return _verified(cached.read_bytes(), str(cached))
    try:
        with urllib.request.urlopen(TASKS_VISION_URL, timeout=60) as response:
            data = _verified(response.read(), TASKS_VISION_URL)
    except OSError as exc:
        raise ExportError(f"--format web: cannot download {TASKS_VISION_URL} ({exc}); without internet, run "
                          f"`npm pack @mediapipe/tasks-vision@{TASKS_VISION_VERSION}` where there is, and set "
                          f"{TASKS_VISION_ENV} to the .tgz") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    runfolder.atomic_write_bytes(cached, data)
    return data


def tasks_vision_files() -> dict[str, bytes]:
    """PACKAGE_FILES of @mediapipe/tasks-vision, by their path in the package."""
    given = os.environ.get(TASKS_VISION_ENV)
    if given and Path(given).is_dir():  # an unpacked package (node_modules/@mediapipe/tasks-vision)
        root = Path(given)
        manifest = root / "package.json"
        version = json.loads(manifest.read_text()).get("version") if manifest.is_file() else None
        if version != TASKS_VISION_VERSION:
            raise ExportError(f"{TASKS_VISION_ENV}={given}: not @mediapipe/tasks-vision {TASKS_VISION_VERSION} "
                              f"(version {version})")
        return {name: (root / name).read_bytes() for name in PACKAGE_FILES}
    if given:
        try:
            data = _verified(Path(given).read_bytes(), f"{TASKS_VISION_ENV}={given}")
        except OSError as exc:
            raise ExportError(f"{TASKS_VISION_ENV}={given}: cannot read it ({exc.strerror or exc})") from None
    else:
        data = _tarball()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return {name: archive.extractfile(f"package/{name}").read() for name in PACKAGE_FILES}


def page_html(info: ModelInfo, size: int) -> str:
    """index.html: the page, with the model's name, classes, input size and unknown threshold filled in."""
    template = resources.files("mobiletune.ship").joinpath("web_page.html").read_text(encoding="utf-8")
    settings = {"size": size, "classes": info.classes, "threshold": info.unknown_threshold,
                "version": TASKS_VISION_VERSION}
    return (template.replace("{{title}}", html.escape(info.name))
            .replace("{{description}}", html.escape(info.description))
            .replace("{{settings}}", json.dumps(settings).replace("<", "\\u003c")))


def write_web(out: Path, tflite: Path, info: ModelInfo, size: int, files: dict[str, bytes]) -> Path:
    """The folder `out`: index.html, the .tflite (as model.tflite) and MediaPipe Tasks' `files`
    (`tasks_vision_files`). Returns `out`."""
    runfolder.make_folder(out / "tasks-vision" / "wasm")
    for name, data in files.items():
        runfolder.atomic_write_bytes(out / "tasks-vision" / name, data)
    shutil.copyfile(tflite, out / MODEL_FILE)
    runfolder.write_text(out / PAGE, page_html(info, size))
    return out
