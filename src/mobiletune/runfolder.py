"""The run folder: created safely, every file written whole.

Each file is written to a temporary name beside its target and renamed over it, so a crash
never leaves a half-written file. An existing non-empty folder is only reused when the user
says so: nothing a user made is overwritten by accident.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from mobiletune.errors import UsageError

# The run folder's files, by name: every module reads and writes them through these.
CONFIG = "config.yaml"  # the resolved config
RUN_INFO = "run.json"  # where the data is, for --resume
SPLIT = "split.csv"  # the manifest: path, class, split, sha256
SKIPPED = "skipped.csv"  # files left out, and why
HISTORY = "history.csv"  # one row per epoch of both phases
METRICS = "metrics.json"  # every number of the run; written last: a run is finished when it exists
PREDICTIONS = "test_predictions.csv"  # each test image's probabilities before and after, its unknown score
MODEL = "model.keras"  # the fine-tuned model
MODEL_BEFORE = "before_fine_tuning.keras"  # the model after phase 1, for `evaluate`
REPORT = "report.html"
SUMMARY = "summary.md"  # the hyper-parameter summary
CHECKPOINT = "checkpoint.npz"  # the last completed epoch of an unfinished run (`training.checkpoint`)
CURVES_BEFORE = "before_fine_tuning.png"  # accuracy and loss per epoch of phase 1
CURVES_AFTER = "after_fine_tuning.png"  # of both phases
UNKNOWN = "unknown.npz"  # the unknown-input detector: its score, threshold and reference rows
MODEL_CARD = "model_card.md"
AUDIT = "audit.csv"  # the audit's findings, most suspicious first
AUDIT_PAGE = "audit.html"
LOGS = "logs"  # TensorBoard's folder (in a sweep folder, one subfolder per trial)
TRIALS = "trials.csv"  # a sweep's trials: state, validation accuracy, knobs, latency, cost
SWEEP_REQUEST = "sweep.yaml"  # in a sweep folder: what the sweep was asked for; marks the folder as a sweep's
SWEEP_BEST = "best"  # ... and the run folder of the config it chose
LABELS = "labels.txt"  # beside an export: its class names, one a line, in output order
EXPORT = "export"  # `mobiletune export RUN`'s default folder
EXPORT_FILES = {"keras": "model.keras", "savedmodel": "savedmodel", "tflite": "model.tflite",  # by format
                "tflite-fp16": "model_fp16.tflite", "tflite-int8": "model_int8.tflite", "onnx": "model.onnx",
                "web": "web"}
EXPORT_RECORD = "export.json"  # in an export folder: the model's sha256 and one re-test per format
EXPORT_REPORT = "report.md"  # ... and the re-tests as a table
EVALUATIONS = "evaluations"  # `evaluate RUN --data DIR`'s default home: one subfolder per DIR, never the run's files
EVALUATION = "evaluation.json"  # there: the numbers of metrics.json for those images (and which images)


def check_out(out: str | Path, *, overwrite: bool) -> Path:
    """Refuse a file, or an existing non-empty folder unless `overwrite`; creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if is_unfinished(out):
            raise UsageError(f"--out {out}: holds a run that did not finish; continue it with mobiletune train "
                             f"--resume {out}, or pick a new --out, or add --overwrite to start it again")
        raise UsageError(f"--out {out}: folder exists and is not empty; pick a new --out or add --overwrite")
    return out


def check_apart(out: str | Path, data_dir: str | Path) -> None:
    """Refuse an `out` inside the folder of images DATA_DIR (or DATA_DIR itself): the next run would read the
    outputs' folders as classes and their charts as images. A CSV's folder is no such folder."""
    data, out = Path(data_dir).resolve(), Path(out).resolve()
    if data.is_dir() and out.is_relative_to(data):
        raise UsageError(f"--out {out}: inside the data folder {data_dir}, where its charts would be read as a "
                         "class of images; give a folder outside it")


def prepare(out: str | Path, *, overwrite: bool) -> Path:
    """Create `out` after `check_out`."""
    return make_folder(check_out(out, overwrite=overwrite))


def make_folder(path: Path, option: str = "--out") -> Path:
    """mkdir -p, or a usage error naming the option that gave the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create it ({exc.strerror or exc})") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes 0600 files; a run folder's files get the mode any other new file would (0644 under umask 022),
# so a report can be served or shared as users expect
FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` with the file it was writing named, where the system left it out (a full disk says only "No
    space left on device"), so the one-line error says which folder filled up."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))


@contextmanager
def exclusive(lock: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an flock on the file `lock` (made if absent): one process at a time on this machine (across
    machines only where the file system shares flocks, as NFS does). `waiting()` is called once if
    another process holds it, before blocking."""
    import fcntl

    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def exclusive_where_possible(lock: Path, waiting: Callable[[], None] | None = None) -> ExitStack:
    """`exclusive(lock)`, entered now, where the folder allows it; else nothing held. Some cannot (read-only,
    another user's lock file, NFS mounted without locks), and there the work is worth more than the lock."""
    held = ExitStack()
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held.enter_context(exclusive(lock, waiting))
    except OSError:
        pass
    return held


def write_text(path: Path, text: str) -> None:
    # surrogateescape: file names that are not UTF-8 round-trip to the bytes on disk
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; a missing or damaged one is a usage error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path.parent}: not a finished mobiletune run folder (no {path.name})") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})") from None


def is_unfinished(run: Path) -> bool:
    """A run folder whose run has not finished (killed, interrupted or still running): `--resume` continues it."""
    return (run / RUN_INFO).is_file() and not (run / METRICS).exists()


def read_resumable(run: Path) -> dict[str, Any]:
    """run.json of a run folder that `--resume` can continue; a finished or foreign folder is a usage error."""
    if not (run / RUN_INFO).is_file():
        raise UsageError(f"--resume {run}: not a mobiletune run folder (no {RUN_INFO})")
    if not is_unfinished(run):
        raise UsageError(f"--resume {run}: this run is already complete")
    return read_json(run / RUN_INFO)


def read_metrics(run: Path) -> dict[str, Any]:
    """A finished run's metrics.json: the one reader of it, with one error for a folder that is no finished run."""
    return read_json(Path(run) / METRICS)


def split_counts(run: Path) -> dict[tuple[str, str], int]:
    """(class, split) -> images in the run's split.csv; empty where the run has none."""
    from collections import Counter

    path = Path(run) / SPLIT
    return dict(Counter((r["class"], r["split"]) for r in read_csv(path))) if path.is_file() else {}


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file written by write_csv; non-UTF-8 file names come back as they went in."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def save_figure(path: Path, figure) -> None:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def save_model(path: Path, model) -> None:
    """model.save() to a temporary .keras file, then rename: never a half-written model."""
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# What commands write from a run's model: exports and evaluations


def read_export_record(folder: Path) -> dict[str, Any] | None:
    """`folder`'s export.json, or None where it holds none that `mobiletune export` wrote (a file of that name that
    is no such record is someone else's)."""
    try:
        record = json.loads((Path(folder) / EXPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("model_sha256"), str)
            and isinstance(record.get("checks"), list)):
        return None
    return record


def remove_export(folder: Path, record: dict[str, Any]) -> None:
    """The files `record`'s export wrote into `folder` (`read_export_record`): its formats, labels, card, report
    and record; nothing else there."""
    formats = [c.get("format") for c in record["checks"] if isinstance(c, dict)]
    names = [EXPORT_FILES[f] for f in formats if isinstance(f, str) and f in EXPORT_FILES]
    for name in {*names, EXPORT_FILES["web"], LABELS, MODEL_CARD, EXPORT_REPORT, EXPORT_RECORD}:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def remove_evaluations(run: Path) -> None:
    """The folders `evaluate RUN --data` wrote under RUN/evaluations (each holding an evaluation.json): their two
    files, and the folders once empty; anything else a user keeps there stays."""
    for folder in sorted(Path(run, EVALUATIONS).glob(f"*/{EVALUATION}")):
        for name in (EVALUATION, PREDICTIONS):
            (folder.parent / name).unlink(missing_ok=True)
        if not any(folder.parent.iterdir()):
            folder.parent.rmdir()
    if Path(run, EVALUATIONS).is_dir() and not any(Path(run, EVALUATIONS).iterdir()):
        Path(run, EVALUATIONS).rmdir()
