"""Decoding: any common image file to RGB at the trained size; batches checked against their digest."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import CATS_DOGS
from mobiletune.config import DataConfig
from mobiletune.data import folders as data
from mobiletune.data import pixels
from mobiletune.errors import DataError

CFG = DataConfig(image_size=32)


def _png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height: PIL must refuse it before allocating."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decode_real_jpeg_to_size():
    raw = (CATS_DOGS / "train" / "cats" / "cat.0.jpg").read_bytes()
    decoded = pixels.decode_image(raw, 48)
    assert decoded.shape == (48, 48, 3) and decoded.dtype == np.uint8 and decoded.std() > 10


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("CMYK", (40, 30), (0, 255, 0, 0)),
        lambda: Image.new("L", (40, 30), 128),
        lambda: Image.new("RGBA", (40, 30), (10, 200, 30, 0)),
        lambda: Image.new("P", (40, 30), 3),
        lambda: Image.fromarray(np.full((30, 40), 40000, np.uint16)),
    ],
    ids=["cmyk", "grayscale", "rgba", "palette", "16-bit"],
)
def test_usable_oddities_are_converted(make):
    image = make()
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    kw = {"transparency": 3} if image.mode == "P" else {}
    image.save(buf, format=fmt, **kw)
    decoded = pixels.decode_image(buf.getvalue(), 16)
    assert decoded.shape == (16, 16, 3)
    if image.mode == "I;16":
        assert 150 <= decoded.mean() <= 160  # 40000 / 256, not clipped to white


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    decoded = pixels.decode_image(buf.getvalue(), 8)
    assert decoded[..., 0].mean() > 200 and decoded[..., 2].mean() < 50


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture\n", "not an image"),
        ((CATS_DOGS / "train" / "cats" / "cat.1.jpg").read_bytes()[:600], "cannot decode"),
        (_huge_png_header(20000, 20000), "too large"),
    ],
    ids=["zero-byte", "text-as-jpg", "truncated-jpeg", "decompression-bomb"],
)
def test_bad_bytes_are_bad_images(payload, reason):
    with pytest.raises(pixels.BadImage, match=reason):
        pixels.decode_image(payload, 32)


def test_pixels_are_decoded_in_batches_and_checked_against_their_hash(cats_dogs_tiny):
    images = data.load_images(cats_dogs_tiny, CFG)
    got = list(pixels.iter_pixels(images, np.arange(5), 32, 2))
    assert [len(rows) for rows, _, _ in got] == [2, 2, 1] and all(p.shape[1:] == (32, 32, 3) for _, p, _ in got)
    (images.root / images.paths[3]).write_bytes((images.root / images.paths[4]).read_bytes())
    rows, _, failed = list(pixels.iter_pixels(images, np.arange(5), 32, 5))[0]
    assert list(rows) == [0, 1, 2, 4] and "changed since it was scanned" in failed[3]
    with pytest.raises(DataError, match="changed since it was scanned"):
        list(pixels.eval_batches(_all_test(images), 32, 4))


def _all_test(images):
    from dataclasses import replace

    return replace(images, splits=np.array(["test"] * len(images.paths)))


def test_a_phone_sized_jpeg_decodes_where_pil_would_refuse_it(tmp_path):
    """A 108-megapixel photo is past PIL's 89 MP limit; as a baseline JPEG it decodes at an eighth of each side. A
    PNG or a progressive JPEG that large is still refused, by the file's header alone too."""
    big = Image.new("RGB", (12000, 9000), (200, 40, 40))
    jpeg, png = io.BytesIO(), io.BytesIO()
    big.save(jpeg, format="JPEG", quality=70)
    big.save(png, format="PNG", compress_level=1)
    (tmp_path / "photo.jpg").write_bytes(jpeg.getvalue())
    (tmp_path / "scan.png").write_bytes(png.getvalue())
    decoded = pixels.decode_image(jpeg.getvalue(), 32)
    assert decoded.shape == (32, 32, 3) and decoded[..., 0].mean() > 180 and decoded[..., 1].mean() < 70
    assert pixels.probe_image(tmp_path / "photo.jpg") is None
    with pytest.raises(pixels.BadImage, match="too large"):
        pixels.decode_image(png.getvalue(), 32)
    assert "too large" in pixels.probe_image(tmp_path / "scan.png")
    progressive = io.BytesIO()  # libjpeg holds every coefficient of a progressive JPEG, however it is scaled
    big.save(progressive, format="JPEG", quality=70, progressive=True)
    with pytest.raises(pixels.BadImage, match="too large"):
        pixels.decode_image(progressive.getvalue(), 32)
