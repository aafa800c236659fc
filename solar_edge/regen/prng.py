"""Portable counter-based PRNG: Philox4x32-10 (Salmon et al., SC'11; Random123).

Every perturbation entry a device regenerates is a pure function of
``(seed, layer_id, stream, index)``, computed with 32-bit integer arithmetic and exact
float operations only, so x86 and ARM boards get bit-identical perturbations (and perturbed
basis columns; checked against x86-64 golden files under aarch64, docs/board-check.md).

Keying (stable, part of the packet format): key = (seed low 32 bits, seed high 32 bits);
counter = (block low 32, block high 32, layer_id, stream), where block ``b`` yields the
four words of elements ``4b .. 4b+3``.
"""

from __future__ import annotations

import numpy as np

from solar_edge.format.records import PerturbationKind

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
ROUNDS = 10


def philox4x32(counters: np.ndarray, key: tuple[int, int], rounds: int = ROUNDS) -> np.ndarray:
    """Apply Philox4x32 to an ``(n, 4)`` array of uint32 counters; returns ``(n, 4)`` uint32."""
    ctr = np.asarray(counters, dtype=np.uint32)
    if ctr.ndim != 2 or ctr.shape[1] != 4:
        raise ValueError("counters must have shape (n, 4)")
    c0, c1, c2, c3 = (ctr[:, i].astype(np.uint64) for i in range(4))
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & 0xFFFFFFFF
            k1 = (k1 + _W1) & 0xFFFFFFFF
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> _SHIFT32, p0 & _MASK32
        hi1, lo1 = p1 >> _SHIFT32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must fit in 32 bits, got {value}")


def random_words(seed: int, layer_id: int, stream: int, start: int, count: int) -> np.ndarray:
    """``count`` uint32 words of the stream ``(seed, layer_id, stream)`` from element ``start``."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    _check_u32("layer_id", layer_id)
    _check_u32("stream", stream)
    if start < 0 or count < 0 or start + count > 2**66:
        raise ValueError("element range out of bounds")
    if count == 0:
        return np.zeros(0, np.uint32)
    first, last = start // 4, (start + count - 1) // 4
    blocks = np.arange(first, last + 1, dtype=np.uint64)
    counters = np.empty((blocks.size, 4), np.uint32)
    counters[:, 0] = (blocks & _MASK32).astype(np.uint32)
    counters[:, 1] = (blocks >> _SHIFT32).astype(np.uint32)
    counters[:, 2] = layer_id
    counters[:, 3] = stream
    words = philox4x32(counters, (seed & 0xFFFFFFFF, seed >> 32)).reshape(-1)
    offset = start - 4 * first
    return words[offset : offset + count]


def words_to_perturbation(words: np.ndarray, kind: PerturbationKind) -> np.ndarray:
    """Map uint32 words to float32 entries with exact arithmetic (no libm)."""
    w = np.asarray(words, dtype=np.uint32)
    if kind == PerturbationKind.RADEMACHER:
        return np.where(w >> np.uint32(31), np.float32(-1.0), np.float32(1.0)).astype(np.float32)
    if kind == PerturbationKind.UNIFORM:
        # 24-bit integer -> exactly representable float32 in [0, 1), then 2u - 1 in [-1, 1)
        u = (w >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
        return u * np.float32(2.0) - np.float32(1.0)
    raise ValueError(f"unknown perturbation kind {kind!r}")


def perturbation_columns(
    seed: int,
    layer_id: int,
    stream: int,
    n_rows: int,
    columns: np.ndarray,
    kind: PerturbationKind = PerturbationKind.RADEMACHER,
) -> np.ndarray:
    """Columns ``columns`` of the ``n_rows x R`` perturbation matrix, as ``(n_rows, len)`` float32.

    Entry ``(r, c)`` is element ``c * n_rows + r`` of the stream, so a column is a contiguous
    counter range and only the columns a packet uses are ever generated. All columns are
    computed in one vectorised Philox call over (at most) ``n_rows / 4 + 2`` blocks per column.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    _check_u32("layer_id", layer_id)
    _check_u32("stream", stream)
    if n_rows < 0:
        raise ValueError(f"n_rows must be non-negative, got {n_rows}")
    cols = np.asarray(columns, dtype=np.int64).reshape(-1)
    if cols.size and (cols.min() < 0 or (int(cols.max()) + 1) * n_rows > 2**66):
        raise ValueError("column index out of bounds")
    if cols.size == 0 or n_rows == 0:
        return np.zeros((n_rows, cols.size), np.float32)
    starts = cols.astype(np.uint64) * np.uint64(n_rows)           # first element per column
    first = starts >> np.uint64(2)                                # its block
    n_blocks = (n_rows + 3) // 4 + 1                              # covers any start alignment
    blocks = first[:, None] + np.arange(n_blocks, dtype=np.uint64)[None, :]
    counters = np.empty((blocks.size, 4), np.uint32)
    flat = blocks.reshape(-1)
    counters[:, 0] = (flat & _MASK32).astype(np.uint32)
    counters[:, 1] = (flat >> _SHIFT32).astype(np.uint32)
    counters[:, 2] = layer_id
    counters[:, 3] = stream
    words = philox4x32(counters, (seed & 0xFFFFFFFF, seed >> 32)).reshape(cols.size, 4 * n_blocks)
    offsets = (starts & np.uint64(3)).astype(np.int64)
    take = offsets[:, None] + np.arange(n_rows, dtype=np.int64)[None, :]
    col_words = np.take_along_axis(words, take, axis=1)           # (len, n_rows)
    return np.ascontiguousarray(words_to_perturbation(col_words, kind).T)
