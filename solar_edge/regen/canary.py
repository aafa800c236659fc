"""Adapter-effect canaries: a packet says, signed, what its adapter outputs on fixed inputs.

A bundle names a few canary inputs (``manifest["canary"]["inputs"]``). When a packet is made,
its served outputs on them (logits, or embeddings without a head) are reduced to a small
digest, ``outputs @ P`` with ``P`` a fixed ``D x DIGEST_DIMS`` Rademacher matrix from the
project's PRNG scaled by ``1/sqrt(D)``, rounded to ``DIGEST_DIGITS`` significant digits, and
carried in the packet's metadata with a tolerance. A device stages the packet, computes the
same digest and refuses the packet when any row differs by more than ``tolerance`` times that
row's largest expected magnitude (plus ``FLOOR``): a patch that silently does nothing, or
the wrong thing, never goes live.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from solar_edge.format.records import PerturbationKind
from solar_edge.regen.prng import perturbation_columns

CANARY_SEED = 0x5AFE_CA4A
CANARY_LAYER_ID = 0xFFFFFFFE
DIGEST_DIMS = 4
DIGEST_DIGITS = 4
DEFAULT_TOLERANCE = 0.02
FLOOR = 1e-3


def projection(width: int) -> np.ndarray:
    """The fixed ``width x DIGEST_DIMS`` projection (±1/sqrt(width))."""
    signs = perturbation_columns(CANARY_SEED, CANARY_LAYER_ID, 0, width,
                                 np.arange(DIGEST_DIMS), PerturbationKind.RADEMACHER)
    return signs.astype(np.float64) / np.sqrt(width)


def digest(outputs: np.ndarray) -> list[list[float]]:
    """``(inputs, width)`` outputs -> ``inputs x DIGEST_DIMS`` rounded floats (JSON-ready)."""
    x = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
    d = x @ projection(x.shape[1])
    return [[float(f"{v:.{DIGEST_DIGITS}g}") for v in row] for row in d]


def mismatch(outputs: np.ndarray, expected: Sequence[Sequence[float]],
             tolerance: float) -> str | None:
    """None when ``outputs`` digest to ``expected`` within tolerance, else what differs."""
    problem = compare(digest(outputs), expected, tolerance, FLOOR)
    return None if problem is None else f"outputs {problem}"


def compare(got: Sequence[Sequence[float]], expected: Sequence[Sequence[float]],
            tolerance: float, floor: float) -> str | None:
    """None when two digests agree: every row within ``tolerance`` times that row's largest
    expected magnitude plus ``floor``; else what differs (a non-finite ``got`` differs)."""
    have = np.asarray(got, np.float64)
    want = np.asarray(expected, np.float64)
    if have.shape != want.shape:
        return f"digest of shape {have.shape}, the packet expects {want.shape}"
    if not np.isfinite(have).all():
        return "digest is not finite"
    scale = np.abs(want).max(axis=1, keepdims=True) + floor
    worst = float((np.abs(have - want) / scale).max())
    if worst > tolerance:
        return f"differ from the packet's expectation by {worst:.3g} (> {tolerance:g})"
    return None


def placeholder(inputs: int) -> list[list[float]]:
    """A digest at least as long in JSON as any real one (to budget the metadata bytes)."""
    return [[-1.234e-100] * DIGEST_DIMS for _ in range(inputs)]
