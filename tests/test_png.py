"""The board's own PNG decoder (``runtime/png.py``) against Pillow's, and its refusals."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

from solar_edge.errors import ImageError
from solar_edge.runtime.png import decode_png

Image = pytest.importorskip("PIL.Image", reason="Pillow writes the reference PNGs")


def _png(array: np.ndarray, mode: str) -> bytes:
    """``array`` written by Pillow (its mode follows from the array; ``P``: a palette)."""
    im = Image.fromarray(array.astype(np.uint8) if mode == "P" else array)
    if mode == "P":
        im.putpalette([(7 * i) % 256 for i in range(3 * 256)])
    assert im.mode == mode
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


rng = np.random.default_rng(3)
SMOOTH = np.add.outer(np.arange(23), np.arange(17)).astype(np.uint8) * 5  # favours sub/up/paeth


@pytest.mark.parametrize("mode,shape", [("L", (23, 17)), ("LA", (23, 17, 2)),
                                        ("RGB", (23, 17, 3)), ("RGBA", (23, 17, 4))])
@pytest.mark.parametrize("content", ["noise", "smooth"])
def test_decodes_what_pillow_reads(mode, shape, content):
    if content == "noise":
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        array = np.broadcast_to(SMOOTH.reshape(23, 17, *([1] * (len(shape) - 2))), shape).copy()
    data = _png(array, mode)
    want = np.asarray(Image.open(io.BytesIO(data)))
    got = decode_png(data)
    assert np.array_equal(got.reshape(want.shape), want)
    assert got.shape == (23, 17, 1 if mode == "L" else shape[2])


def test_every_filter_type_unfilters_exactly():
    """One PNG per filter type (0-4) written here by hand, row filters applied as the PNG
    spec defines them (independently of the decoder)."""
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    for kind in range(5):
        raw = bytearray()
        prev = np.zeros(33, np.int64)
        for row in image.reshape(9, 33).astype(np.int64):
            left = np.concatenate([np.zeros(3, np.int64), row[:-3]])
            upleft = np.concatenate([np.zeros(3, np.int64), prev[:-3]])
            if kind == 0:
                pred = np.zeros_like(row)
            elif kind == 1:
                pred = left
            elif kind == 2:
                pred = prev
            elif kind == 3:
                pred = (left + prev) // 2
            else:
                p = left + prev - upleft
                pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
                pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
            raw += bytes([kind]) + bytes(((row - pred) % 256).astype(np.uint8))
            prev = row
        assert np.array_equal(decode_png(_assemble(11, 9, 2, zlib.compress(bytes(raw)))), image)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _assemble(width: int, height: int, ctype: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, ctype, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def test_palette_and_16_bit():
    index = rng.integers(0, 200, (8, 8))
    data = _png(index, "P")
    assert np.array_equal(decode_png(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    deep = rng.integers(0, 65536, (6, 5), dtype=np.uint16)
    data = _png(deep, "I;16")
    assert np.array_equal(decode_png(data)[..., 0], np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("cut", [10, 40, -20, -13])
def test_truncated_file_is_one_image_error(cut):
    data = _png(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L")
    with pytest.raises(ImageError, match="truncated PNG"):
        decode_png(data[:cut])


def test_bad_crc_and_short_image_data():
    data = bytearray(_png(SMOOTH, "L"))
    data[40] ^= 0xFF  # inside the IDAT body
    with pytest.raises(ImageError, match="bad CRC"):
        decode_png(bytes(data))
    short = zlib.compress(b"\0" + bytes(17))  # one row of 23
    with pytest.raises(ImageError, match="truncated PNG \\(image data holds 18 of 414"):
        decode_png(_assemble(17, 23, 0, short))
    with pytest.raises(ImageError, match="not a PNG"):
        decode_png(b"GIF89a....")
