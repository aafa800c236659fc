"""A small PNG decoder on zlib and numpy, for boards without Pillow.

Reads non-interlaced PNGs of bit depth 8 or 16: grayscale, grayscale + alpha, RGB, RGBA
and 8-bit palette images (palette entries become RGB; a ``tRNS`` chunk is ignored). Every
chunk's CRC is checked and the image data must inflate to exactly the rows the header
declares, so a truncated or corrupted file is an :class:`~solar_edge.errors.ImageError`,
never a partial image. Result: ``(height, width, channels)`` uint8, or uint16 at depth 16.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from solar_edge.errors import ImageError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 1 << 24          # 16 Mpixel: far above any model input, bounds memory
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}   # colour type -> stored samples per pixel


def _chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    pos, out = len(SIGNATURE), []
    while True:
        if pos + 8 > len(data):
            raise ImageError(f"{name}: truncated PNG (chunk header cut at byte {pos})")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise ImageError(f"{name}: truncated PNG ({kind.decode('latin-1')} chunk needs "
                             f"{length} bytes, {len(data) - pos - 12} left)")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:end])
        if zlib.crc32(kind + body) != crc:
            raise ImageError(f"{name}: corrupted PNG (bad CRC in {kind.decode('latin-1')} "
                             "chunk)")
        out.append((kind, body))
        pos = end
        if kind == b"IEND":
            return out


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, name: str) -> np.ndarray:
    """Undo the per-row filters (none, sub, up, average, Paeth) into ``(height, stride)``."""
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:  # sub: a running sum per byte position within the pixel
            pad = (-stride) % bpp
            cur = np.cumsum(np.pad(line, (0, pad)).reshape(-1, bpp), axis=0).reshape(-1)
            cur = cur[:stride] & 0xFF
        elif kind == 2:
            cur = (line + prev) & 0xFF
        elif kind in (3, 4):
            cur = np.zeros(stride, np.int32)
            for i in range(stride):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b = int(prev[i])
                if kind == 3:
                    pred = (a + b) >> 1
                else:
                    c = int(prev[i - bpp]) if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (int(line[i]) + pred) & 0xFF
        else:
            raise ImageError(f"{name}: corrupted PNG (row {y} has filter type {kind})")
        out[y] = cur
        prev = cur.astype(np.int32)
    return out


def decode_png(data: bytes, name: str = "image") -> np.ndarray:
    """PNG bytes -> ``(height, width, channels)`` array; ImageError for anything else."""
    if not data.startswith(SIGNATURE):
        raise ImageError(f"{name}: not a PNG file")
    chunks = _chunks(data, name)
    if chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise ImageError(f"{name}: corrupted PNG (no IHDR header first)")
    width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if ctype not in CHANNELS or depth not in (8, 16) or (ctype == 3 and depth != 8):
        raise ImageError(f"{name}: PNG colour type {ctype} at bit depth {depth} is not "
                         "supported (8 or 16 bits; gray, RGB, palette, with or without alpha)")
    if comp or filt or interlace:
        raise ImageError(f"{name}: interlaced or non-standard PNG is not supported")
    if not 0 < width * height <= MAX_PIXELS:
        raise ImageError(f"{name}: PNG of {width}x{height} pixels (at most {MAX_PIXELS})")
    samples = CHANNELS[ctype]
    bpp = samples * depth // 8
    stride = width * bpp
    inflater = zlib.decompressobj()
    want = height * (stride + 1)
    try:
        raw = inflater.decompress(b"".join(b for k, b in chunks if k == b"IDAT"), want + 1)
    except zlib.error as exc:
        raise ImageError(f"{name}: corrupted PNG image data ({exc})") from exc
    if len(raw) != want or not inflater.eof:
        raise ImageError(f"{name}: truncated PNG (image data holds {len(raw)} of {want} bytes)")
    pixels = _unfilter(raw, height, stride, bpp, name)
    if depth == 16:
        image = pixels.reshape(height, width * samples, 2)
        array = (image[..., 0].astype(np.uint16) << 8 | image[..., 1]).reshape(
            height, width, samples)
    else:
        array = pixels.reshape(height, width, samples)
    if ctype == 3:
        palette = next((b for k, b in chunks if k == b"PLTE"), None)
        if palette is None or len(palette) % 3:
            raise ImageError(f"{name}: palette PNG without a valid PLTE chunk")
        table = np.frombuffer(palette, np.uint8).reshape(-1, 3)
        index = array[..., 0]
        if int(index.max()) >= len(table):
            raise ImageError(f"{name}: palette index beyond the {len(table)}-entry palette")
        array = table[index]
    return np.ascontiguousarray(array)
