"""Pixels: decode any common image file, in parallel batches, checked against its scanned digest.

Nothing here holds a whole data set: `iter_pixels` decodes a batch at a time (one ahead) in
threads, since PIL decodes without the GIL, and the tf.data pipeline decodes as it goes. Every
read is checked against the sha256 the scan recorded, so a file edited mid-run is refused rather
than trained on under its old name.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from mobiletune.errors import DataError

if TYPE_CHECKING:
    from mobiletune.data.images import ImageSet


# The reason for a file whose bytes no longer match its scanned digest: not bad content, only new content.
CHANGED = "changed since it was scanned; run again to use its new content"


JPEG_MAX_PIXELS = 250_000_000  # above PIL's own limit (89 MP, which phones' 108-200 MP photos pass), a baseline
# JPEG is still opened up to this: `draft` decodes it at an eighth of each side (~25 MB for 200 MP). A progressive
# one is not: libjpeg holds all its coefficients however it is scaled (~3 bytes a pixel, measured)
JPEG_MAGIC = b"\xff\xd8\xff"
_OPENING = threading.Lock()  # `warnings.catch_warnings` swaps process-wide state: one thread at a time in it


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason users see."""


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Bytes of any common image file -> uint8 RGB [size, size, 3].

    Oddities that still hold a picture are converted, not refused: EXIF rotation, CMYK,
    grayscale, 16-bit, palette and alpha (dropped), animation (first frame). Raises BadImage.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        image = open_image(data)
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")  # palette transparency: alpha is then dropped below
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too large to decode safely ({exc.__class__.__name__})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"cannot decode ({exc})") from None


def resized_like_a_jpeg(pixels: np.ndarray, size: int) -> np.ndarray:
    """RGB pixels [height, width, 3] 0-255 at [size, size, 3], resized as `decode_image` resizes a JPEG file: first
    shrunk by the largest of 8, 4 or 2 that leaves both sides at least `size` (PIL's `draft` scales a JPEG so, in
    its decoder; here by averaging blocks), then bilinear. An array of a photo then gets what its JPEG file gets
    (resized from full size in one step, a cat the model called 0.86 "cats" from the file scored 0.78)."""
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    factor = next((f for f in (8, 4, 2) if min(image.width // size, image.height // size) >= f), 1)
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def probe_image(path: Path) -> str | None:
    """Why `path` is not an image, from its header alone (cheap: the scan runs it on new files); None if it may be.

    Catches empty, foreign and oversized files; a file damaged further in is caught when decoded.
    """
    try:
        with open_image(path) as image:
            image.size  # noqa: B018 - the header is parsed by now
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"too large to decode safely ({exc.__class__.__name__})"
    except Image.UnidentifiedImageError:
        return "empty file (0 bytes)" if path.stat().st_size == 0 else "not an image PIL can read"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"cannot decode ({exc})"
    return None


def open_image(source: bytes | Path) -> Image.Image:
    """PIL's lazy open, refusing what its decompression-bomb limit warns of (Image.DecompressionBombWarning raised),
    except a JPEG: that is opened up to JPEG_MAX_PIXELS, for `draft` to decode at a reduced scale."""
    from PIL import JpegImagePlugin

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with _OPENING, warnings.catch_warnings():  # the header alone is read here: the lock costs little
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        if isinstance(source, Path):
            with source.open("rb") as file:
                head = file.read(len(JPEG_MAGIC))
        else:
            head = source[:len(JPEG_MAGIC)]
        if head != JPEG_MAGIC:
            raise
    image = JpegImagePlugin.JpegImageFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    if image.size[0] * image.size[1] > JPEG_MAX_PIXELS or image.info.get("progressive"):
        image.close()
        raise Image.DecompressionBombError(f"{image.size[0]}x{image.size[1]} pixels")
    return image


def read_image(path: Path, size: int, sha256: str | None = None) -> np.ndarray:
    """Decode one file. With `sha256`, a file whose bytes are no longer those scanned is refused
    (BadImage): a stale digest must never name new pixels."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror or exc})") from None
    return decode_checked(data, size, sha256)


def decode_checked(data: bytes, size: int, sha256: str | None) -> np.ndarray:
    """`decode_image`, refusing bytes that are not the ones scanned (when `sha256` is given): where a file's
    bytes are decoded away from the machine that read them (a Ray actor), the same rule holds."""
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BadImage(CHANGED)
    return decode_image(data, size)


def iter_pixels(images: ImageSet, positions: np.ndarray, size: int, batch: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, str]]]:
    """Decode `positions` of `images` in parallel threads, a batch at a time, one batch ahead.

    Yields (positions decoded, uint8 pixels [k, size, size, 3], {position: reason} of those that
    failed). Only a couple of batches are ever in memory.
    """
    def one(i: int) -> np.ndarray | str:
        try:
            return read_image(images.root / images.paths[i], size, images.hashes[i])
        except BadImage as exc:
            return str(exc)

    chunks = [positions[s : s + batch] for s in range(0, len(positions), batch)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # PIL decodes without the GIL
        pending = [pool.map(one, chunks[0])] if chunks else []
        for k, chunk in enumerate(chunks):
            if k + 1 < len(chunks):
                pending.append(pool.map(one, chunks[k + 1]))
            results = list(pending.pop(0))
            ok = [j for j, r in enumerate(results) if not isinstance(r, str)]
            pixels = np.stack([results[j] for j in ok]) if ok else np.empty((0, size, size, 3), np.uint8)
            yield chunk[ok], pixels, {int(chunk[j]): r for j, r in enumerate(results) if isinstance(r, str)}


# ---------------------------------------------------------------------------------------------
# Feeding Keras


def pixel_dataset(images: ImageSet, split: str, size: int, batch_size: int, *, shuffle: bool, seed: int,
                  initial_epoch: int = 0, epochs: int = 1):
    """A batched tf.data pipeline of (float32 pixels 0-255, int label) for one split, decoded as it goes.

    Shuffled: epochs `initial_epoch` .. `epochs - 1` back to back, epoch e in an order drawn
    from (seed, e) alone, so a resumed run sees exactly the batches an unbroken one would.
    Fit it with steps_per_epoch = ceil(n / batch_size). Files are checked by `check_decodable` first.
    """
    import tensorflow as tf

    idx = images.indices(split)
    labels = tf.constant(images.labels[idx])

    def decode(rows: np.ndarray) -> np.ndarray:
        return np.stack([read_image(images.root / images.paths[idx[r]], size, images.hashes[idx[r]]) for r in rows])

    if shuffle:
        def epoch_order(epoch):
            order = tf.random.experimental.stateless_shuffle(tf.range(len(idx)), seed=tf.stack([seed, epoch]))
            return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

        batches = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_order)
    else:
        batches = tf.data.Dataset.range(len(idx)).batch(batch_size)

    def load(rows):
        pixels = tf.numpy_function(decode, [rows], tf.uint8, stateful=False)
        pixels.set_shape([None, size, size, 3])
        return tf.cast(pixels, tf.float32), tf.gather(labels, rows)

    return prefetched(batches, load)


def prefetched(batches, load):
    """`batches.map(load)` on one thread per core, two batches ahead, without tf.data's autotuner.

    The autotuner's model thread wakes after 10, 20, 40 ... 5120 ms, and an iterator torn down
    at the end of an epoch could wait for its next wake-up: measured, a third of phase-2 epochs
    ran to exactly 5.12 s (10.24 s on AVX2) instead of 3.4 s (benchmarks/phase2.py).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.map(load, num_parallel_calls=os.cpu_count() or 2).prefetch(2).with_options(options)


def eval_batches(images: ImageSet, size: int, batch: int, split: str = "test", rows: np.ndarray | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 pixels, labels) of `split` in order (or of its images at `rows`, positions within the split),
    unaugmented, for `statistics.predict_logits`. A file that changed or broke since it was scanned is an error:
    a test set must not shrink unseen."""
    positions = images.indices(split) if rows is None else images.indices(split)[rows]
    for rows, pixels, failed in iter_pixels(images, positions, size, batch):
        if failed:
            i, reason = next(iter(failed.items()))
            raise DataError(f"{images.root / images.paths[i]}: {reason}; run again")
        yield pixels.astype(np.float32), images.labels[rows]
