"""Symmetric per-group quantisation, bit packing, and the exact packet size of values.

Size contract (shared with ``solar_edge.packet``; see docs/architecture.md "Codec contract"):

* integer formats (b = 2..8 bits): codes bit-packed LSB-first as offset-binary
  ``code + 2**(b-1)`` -> ``ceil(count * b / 8)`` bytes, then one float16 scale per
  ``group_size`` values -> ``2 * ceil(count / group_size)`` bytes;
* FLOAT16: ``2 * count`` bytes; FLOAT32: ``4 * count`` bytes;
* positions: LEB128 varints of the deltas of strictly increasing flat indices
  (first delta = first index).
"""

from __future__ import annotations

import numpy as np

from solar_edge.errors import CodecError
from solar_edge.records import QuantizedValues, ValueFormat

_F16_MAX = float(np.finfo(np.float16).max)


def qmax(fmt: ValueFormat) -> int:
    """Largest code magnitude of an integer format: ``2**(b-1) - 1``."""
    return (1 << (fmt.bits - 1)) - 1


def _group_scales(absmax: np.ndarray, q: int) -> np.ndarray:
    """float16 scales with ``float32(scale) * q >= absmax`` (no clipping), 0 for zero groups."""
    if np.any(absmax / q > _F16_MAX):
        raise CodecError("value too large for a float16 group scale")
    scales = (absmax / q).astype(np.float16)
    too_small = scales.astype(np.float32) * np.float32(q) < absmax
    scales[too_small] = np.nextafter(scales[too_small], np.float16(np.inf))
    return scales


def quantize(values: np.ndarray, fmt: ValueFormat, group_size: int = 64) -> QuantizedValues:
    """Quantise a 1-D array. Integer formats: round-to-nearest against the float16 scale."""
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise CodecError("cannot quantise non-finite values")
    fmt = ValueFormat(fmt)
    if fmt == ValueFormat.FLOAT32:
        return QuantizedValues(fmt, x.size, raw=x.copy())
    if fmt == ValueFormat.FLOAT16:
        if x.size and float(np.abs(x).max()) > _F16_MAX:
            raise CodecError("value too large for float16")
        return QuantizedValues(fmt, x.size, raw=x.astype(np.float16))
    if not 1 <= group_size <= 0xFFFF:
        raise CodecError(f"group_size must be in 1..65535, got {group_size}")
    q = qmax(fmt)
    n_groups = -(-x.size // group_size)
    padded = np.zeros(n_groups * group_size, np.float32)
    padded[: x.size] = x
    groups = padded.reshape(n_groups, group_size)
    scales = _group_scales(np.abs(groups).max(axis=1), q)
    s32 = scales.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s32 > 0, np.rint(groups / s32), 0.0)
    codes = np.clip(codes, -q, q).astype(np.int8).reshape(-1)[: x.size]
    return QuantizedValues(fmt, x.size, group_size, codes=codes, scales=scales)


def values_nbytes(fmt: ValueFormat, count: int, group_size: int = 64) -> int:
    """Bytes the values of a record take in a packet (see the module docstring)."""
    fmt = ValueFormat(fmt)
    if fmt == ValueFormat.FLOAT32:
        return 4 * count
    if fmt == ValueFormat.FLOAT16:
        return 2 * count
    if group_size < 1:
        raise CodecError(f"group_size must be positive, got {group_size}")
    return -(-count * fmt.bits // 8) + 2 * (-(-count // group_size))


def quantized_nbytes(qv: QuantizedValues) -> int:
    return values_nbytes(qv.fmt, qv.count, qv.group_size)


def varint_nbytes(values: np.ndarray) -> np.ndarray:
    """LEB128 length of each non-negative integer (1 byte per started 7 bits, min 1)."""
    v = np.asarray(values, dtype=np.uint64)
    n = np.ones(v.shape, np.int64)
    for k in range(1, 10):
        n += v >= np.uint64(1 << (7 * k))
    return n


def positions_nbytes(positions: np.ndarray) -> int:
    """Bytes of LEB128 delta-coded positions (strictly increasing; first delta = first index)."""
    p = np.asarray(positions, dtype=np.int64).reshape(-1)
    if p.size == 0:
        return 0
    deltas = np.diff(p, prepend=0)
    if p[0] < 0 or (p.size > 1 and np.any(deltas[1:] <= 0)):
        raise CodecError("positions must be non-negative and strictly increasing")
    return int(varint_nbytes(deltas).sum())


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Bit-pack signed codes as offset-binary ``code + 2**(bits-1)``, LSB-first."""
    if not 2 <= bits <= 8:
        raise CodecError(f"bits must be in 2..8, got {bits}")
    u = (np.asarray(codes, np.int16).reshape(-1) + (1 << (bits - 1))).astype(np.uint8)
    bit_matrix = np.unpackbits(u[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` signed int8 codes (offset 0 not rejected here)."""
    if not 2 <= bits <= 8:
        raise CodecError(f"bits must be in 2..8, got {bits}")
    if len(data) != -(-count * bits // 8):
        raise CodecError(f"expected {-(-count * bits // 8)} code bytes, got {len(data)}")
    stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: count * bits]
    u = np.packbits(stream.reshape(count, bits), axis=1, bitorder="little").reshape(-1)
    return (u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
