"""A chunk of the feature store through the frozen layers: which views of which images it holds, each batch of
decoded images in the views it needs, and the shard files the outputs go to. What a feature pass computes, in
this process or in a Ray actor (`cluster`), to the same numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np

from mobiletune.config import Config
from mobiletune.model import augment, convention


def store_dtype(output_index: int) -> str:
    # Pooled features are small: kept exact. Boundary activations are large: float16 halves the
    # cache and the page-cache traffic; the rounding (~1e-3 relative) is far below augmentation noise.
    return "float32" if output_index == 0 else "float16"


def output_files(folder: Path, extract: keras.Model, rows: int) -> list[np.ndarray]:
    """A shard's output files in `folder`, `rows` rows each, written in place as results come."""
    return [np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=store_dtype(k),
                                      shape=(rows, *o.shape[1:]))
            for k, o in enumerate(extract.outputs)]


def views_wanted(chunk: list[bytes], item_of: dict) -> dict[int, list[tuple[int | None, bytes]]]:
    """Image position -> its (view, key) in `chunk`, in image order: each image is decoded once, however many of
    its views the chunk holds (chunks are image-major)."""
    wanted: dict[int, list[tuple[int | None, bytes]]] = {}
    for k in chunk:
        position, view = item_of[k]
        wanted.setdefault(position, []).append((view, k))
    return dict(sorted(wanted.items()))


class ShardRows:
    """A chunk's shard files being filled: a batch's outputs into the rows of their items, an image that failed
    remembered (`failed`: position -> reason) with its items, which the shard then leaves out."""

    def __init__(self, folder: Path, extract: keras.Model, chunk: list[bytes], item_of: dict, failed: dict[int, str]):
        self.rows = {k: r for r, k in enumerate(chunk)}
        self.wanted = views_wanted(chunk, item_of)
        self.files = output_files(folder, extract, len(chunk))
        self.failed, self.bad = failed, set()

    def fail(self, position: int, reason: str) -> None:
        self.failed[position] = reason
        self.bad.update(k for _, k in self.wanted[position])

    def write(self, positions: list[int], results) -> None:
        """`results`: (rows of the batch, view, outputs) as `ViewPass` yields them; `positions[row]` is the image."""
        for batch_rows, view, outs in results:
            at = [self.rows[k] for j in batch_rows for v, k in self.wanted[positions[j]] if v == view]
            for f, o in zip(self.files, outs, strict=True):
                f[at] = o

    def close(self) -> set[bytes]:
        """Flush the files; the keys that could not be computed."""
        for f in self.files:
            f.flush()
        self.files = []
        return self.bad


Runner = Callable[[np.ndarray], list[np.ndarray]]  # scaled pixels -> the extractor's outputs


def _view_order(view: int | None) -> int:
    return -1 if view is None else view


class ViewPass:
    """Augments a view's images with their own draws (none for the plain view), scales them as the model's
    Rescaling layer does and runs the extractor on them."""

    def __init__(self, run: Runner, config: Config):
        self.run, self.config = run, config
        self._augment = None  # built on the first augmented view: a plain pass never imports TensorFlow's ops

    def __call__(self, pixels: np.ndarray, digests: list[str], views: list[list[int | None]]
                 ) -> Iterator[tuple[list[int], int | None, list[np.ndarray]]]:
        """(rows of the batch, view, outputs) for every view that `views[row]` (the views image `row` needs)
        names; `digests` are the images' sha256, which their augmentation draws depend on."""
        for view in sorted({v for wanted in views for v in wanted}, key=_view_order):
            rows = [j for j, wanted in enumerate(views) if view in wanted]
            x = pixels[rows].astype(np.float32)
            if view is not None:
                if self._augment is None:
                    self._augment = augment.view_augmenter(self.config.augment.flip, self.config.augment.rotation)
                x = self._augment(x, *augment.view_draws(self.config, [digests[j] for j in rows], view))
            yield rows, view, self.run(convention.to_unit(x))
