"""How long the shipped model takes per image on this machine: its TFLite model (float or int8, the
ops `export` ships), batch 1, XNNPACK, the fastest of several medians of repeated runs.

A sweep trades accuracy against this figure, so it is measured, not estimated from FLOPs: the
same FLOPs run at different speeds at different sizes and precisions. It depends on the
architecture, the input size, the number of classes and the format, not on the trained weights,
so it is measured once per (host, size, classes, format) and kept in the cache folder. The
figures hold for this host only; a sweep names it (`objectives.hosts`) wherever they are shown.
"""

from __future__ import annotations

import functools
import json
import platform
import socket
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mobiletune import runfolder
from mobiletune.config import Config, from_flat
from mobiletune.errors import ExportError

if TYPE_CHECKING:
    from mobiletune.model.network import Classifier

FORMATS = ("tflite", "tflite-int8")
FILE_NAME = "latency.json"
# Batch-1 runs per measurement: BLOCKS medians of REPEATS runs each, after warm-up, and the fastest
# median counts. Interference (another process, a garbage collection, a thread pool still waking)
# only ever slows a run down, and one median of 50 sub-millisecond runs read 40% high once.
REPEATS = 20
BLOCKS = 5
CALIBRATION_IMAGES = 16  # int8 ranges for a timing model: its accuracy is not used, so random pixels do


@functools.cache
def host() -> str:
    """The CPU model and its widest vector ISA, e.g. "AMD EPYC 9B14, 2 CPUs, AVX-512"."""
    import os

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return f"{model}, {os.cpu_count()} CPUs, {isa}"


def _key(config: Config, num_classes: int, fmt: str) -> str:
    return (f"{host()}|{config.data.image_size}px|alpha {config.model.alpha:g}|{num_classes} classes|{fmt}"
            f"|litert {version('ai-edge-litert')}"
            f"|best of {BLOCKS} medians of {REPEATS}")


def latency_ms(config: Config, num_classes: int, fmt: str, cache_dir: Path | None,
               classifier: Classifier | None = None) -> float:
    """Batch-1 milliseconds of `config`'s model as `fmt` (`measure`); from the cache when known. The
    formats not yet known for this size are measured together: they share the model and its trace.
    `classifier`: one of `config`'s architecture and size to convert if a measurement is needed."""
    assert fmt in FORMATS, fmt
    key = _key(config, num_classes, fmt)
    if key in _FAILED:
        raise _FAILED[key]  # once per process, not again for every trial
    table_path = cache_dir / FILE_NAME if cache_dir is not None else None
    table = _read(table_path)
    if key not in table:
        # one timing at a time among this machine's processes sharing the cache: two at once slow each other
        # down (two sweep workers started together timed the 224-px model at 3.98 ms instead of 1.66)
        with (runfolder.exclusive_where_possible(cache_dir / f".latency-{socket.gethostname()}.lock")
              if cache_dir is not None else nullcontext()):
            table = _read(table_path)  # as it is now: another worker may have measured it while this one waited
            if key not in table:
                table = _measure_into(table, table_path, config, num_classes, fmt, classifier)
    return table[key]


def _measure_into(table: dict[str, float], table_path: Path | None, config: Config, num_classes: int,
                  fmt: str, classifier: Classifier | None = None) -> dict[str, float]:
    """Measure the formats of this size `table` lacks (only `fmt` without a cache file), add them to it,
    save and return it; raise `fmt`'s error if it failed."""
    wanted = [f for f in FORMATS if _key(config, num_classes, f) not in table] if table_path else [fmt]
    measured, failed = measure(config, num_classes, wanted, classifier=classifier)
    _FAILED.update({_key(config, num_classes, f): error for f, error in failed.items()})
    table = {**table, **{_key(config, num_classes, f): ms for f, ms in measured.items()}}
    if table_path is not None and measured:
        try:
            runfolder.write_json(table_path, table)
        except OSError:
            pass  # only a cache: measured again next time
    if fmt in failed:
        raise failed[fmt]
    return table


_FAILED: dict[str, ExportError] = {}  # formats that failed to convert, by cache key, in this process


def _read(path: Path | None) -> dict[str, float]:
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache file is measured again


def measure(config: Config, num_classes: int, formats: Sequence[str] = FORMATS, repeats: int = REPEATS,
            blocks: int = BLOCKS, classifier: Classifier | None = None
            ) -> tuple[dict[str, float], dict[str, ExportError]]:
    """Convert a model of `config`'s architecture and size to each of `formats` (the ops `export` would
    ship) and time it: the fastest of `blocks` medians of `repeats` batch-1 runs. `classifier`: one of them
    (its weights do not matter to the timing; a sweep passes the extractor it builds anyway, 0.45 s a
    size), or an untrained one is built. Returns the milliseconds of the formats that converted and ran,
    and the error of those that did not."""
    from mobiletune.model.network import create_model
    from mobiletune.ship.export import first_line, latency_of, serving_function, tflite_for_timing
    from mobiletune.ship.predict import TFLitePredictor

    size = config.data.image_size
    if classifier is None:
        classifier = create_model(from_flat({**config.flat(), "model.weights": "none"}), num_classes)
    function = serving_function(classifier)
    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 255, (CALIBRATION_IMAGES, size, size, 3)).astype(np.float32)
    measured, failed = {}, {}
    with tempfile.TemporaryDirectory(prefix="mobiletune-latency-", ignore_cleanup_errors=True) as scratch:
        for fmt in formats:
            path = Path(scratch) / f"{fmt}.tflite"
            try:
                path.write_bytes(tflite_for_timing(function, fmt, calibration))
                predictor = TFLitePredictor(path, [str(i) for i in range(num_classes)])
                measured[fmt] = min(latency_of(predictor, calibration[0], repeats) for _ in range(blocks))
            except Exception as exc:  # noqa: BLE001 - converters and runtimes raise anything; name the format
                failed[fmt] = ExportError(f"export {fmt}: conversion failed ({first_line(exc)})")
    return measured, failed
