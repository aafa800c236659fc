"""Byte encodings inside a packet body: LEB128 delta positions and bit-packed integer codes.

Encoders take validated arrays. Decoders take hostile bytes whose length the caller has
already checked against its limits; they allocate in proportion to that length only and
raise ``ValueError`` (the packet layer wraps it with the field name) on any
non-canonical or out-of-range encoding. Both directions are vectorised with numpy.
"""

from __future__ import annotations

import numpy as np

MAX_VARINT_BYTES = 5  # positions are < 2**32


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """LEB128 length of each value in ``[0, 2**32)``: one byte per started 7 bits, at least 1."""
    v = np.asarray(values, dtype=np.uint64)
    n = np.ones(v.shape, np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        n += v >= np.uint64(1 << (7 * k))
    return n


def position_deltas(positions: np.ndarray) -> np.ndarray:
    """First index, then successive differences (the values that are varint-coded)."""
    p = np.asarray(positions, dtype=np.uint64).reshape(-1)
    if p.size == 0:
        return p
    return np.concatenate([p[:1], p[1:] - p[:-1]])


def encode_positions(positions: np.ndarray) -> bytes:
    """Strictly increasing indices ``< 2**32`` -> LEB128 varints of their deltas."""
    deltas = position_deltas(positions)
    if deltas.size == 0:
        return b""
    sizes = varint_sizes(deltas)
    k = np.arange(MAX_VARINT_BYTES, dtype=np.uint64)
    groups = (deltas[:, None] >> (np.uint64(7) * k)) & np.uint64(0x7F)
    more = k[None, :] < (sizes[:, None] - 1).astype(np.uint64)
    table = (groups | np.where(more, np.uint64(0x80), np.uint64(0))).astype(np.uint8)
    keep = k[None, :] < sizes[:, None].astype(np.uint64)
    return table[keep].tobytes()


def decode_positions(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`encode_positions`: ``count`` uint64 indices, strictly increasing.

    Rejects: a varint count other than ``count``, bytes after the last varint, varints longer
    than 5 bytes or above ``2**32 - 1``, overlong forms (a final byte of 0 after a
    continuation), and zero deltas after the first position.
    """
    b = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if b.size:
            raise ValueError("positions bytes given for a record without positions")
        return np.zeros(0, np.uint64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or ends[-1] != b.size - 1:
        raise ValueError(f"expected exactly {count} varints in {b.size} bytes")
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise ValueError("varint longer than 5 bytes")
    if np.any(b[ends[lengths > 1]] == 0):
        raise ValueError("overlong varint (non-canonical)")
    if np.any(b[ends[lengths == MAX_VARINT_BYTES]] > 0x0F):
        raise ValueError("varint above 2**32 - 1")
    shifts = (7 * (np.arange(b.size) - np.repeat(starts, lengths))).astype(np.uint64)
    parts = (b & np.uint8(0x7F)).astype(np.uint64) << shifts
    deltas = np.add.reduceat(parts, starts)
    if count > 1 and np.any(deltas[1:] == 0):
        raise ValueError("positions are not strictly increasing")
    return np.cumsum(deltas, dtype=np.uint64)


def codes_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits, padded to a whole byte."""
    return -(-count * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Signed codes in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` -> offset-binary, LSB-first."""
    u = (np.asarray(codes, np.int16).reshape(-1) + (1 << (bits - 1))).astype(np.uint8)
    bit_matrix = np.unpackbits(u[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` int8 codes.

    Rejects a byte length other than ``ceil(count * bits / 8)``, non-zero padding bits and
    the unused offset-binary value 0 (code ``-2**(bits-1)``).
    """
    if len(data) != codes_nbytes(count, bits):
        raise ValueError(f"expected {codes_nbytes(count, bits)} code bytes, got {len(data)}")
    raw = np.frombuffer(data, np.uint8)
    if bits == 8:  # whole bytes: the offset-binary values themselves
        u = raw
    elif bits == 4:  # two codes per byte, the first in the low nibble
        u = np.empty(2 * raw.size, np.uint8)
        u[0::2] = raw & np.uint8(0x0F)
        u[1::2] = raw >> np.uint8(4)
        if np.any(u[count:]):
            raise ValueError("non-zero padding bits after the last code")
        u = u[:count]
    else:
        stream = np.unpackbits(raw, bitorder="little")
        if np.any(stream[count * bits :]):
            raise ValueError("non-zero padding bits after the last code")
        u = np.packbits(
            stream[: count * bits].reshape(count, bits), axis=1, bitorder="little"
        ).reshape(-1)
    if not u.all():  # an offset-binary 0 (no temporary array)
        raise ValueError(f"code -{1 << (bits - 1)} is outside the symmetric range")
    if bits == 8:  # u - 128 as int8 is u with its top bit flipped
        return (u ^ np.uint8(0x80)).view(np.int8)
    return u.view(np.int8) - np.int8(1 << (bits - 1))  # u < 2**7: no int8 overflow
