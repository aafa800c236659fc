"""Pure numeric patching: ``W0 + L @ Rt.T`` into separate buffers, factor-cache sizes.

Graphs store an adaptable Linear weight transposed (``W0.T``, ``in x out``) as the right
operand of a ``MatMul``; the update arrives as low-rank factors ``(L, Rt)`` with
``dW = L @ Rt.T``. Everything here reads the pristine base weight (memory-mapped, never
written) and writes a separate buffer, so switching adapters never accumulates error.
Cost is ``in * out * k`` for rank ``k``: proportional to what the packet keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from solar_edge.errors import HealthCheckError, RuntimeApplyError
from solar_edge.format.graph import lora_slot_names

F32_MAX = float(np.finfo(np.float32).max)

Factors = tuple[np.ndarray, np.ndarray]  # (L: out x k, Rt: in x k), dW = L @ Rt.T


def check_factors(layer_id: int, shape: tuple[int, int], factors: Factors) -> Factors:
    """Validate ``(L, Rt)`` against the weight's ``(out, in)`` shape; float32, finite."""
    left, right_t = (np.asarray(f, dtype=np.float32) for f in factors)
    out_f, in_f = shape
    if left.ndim != 2 or right_t.ndim != 2 or left.shape[1] != right_t.shape[1]:
        raise RuntimeApplyError(f"layer {layer_id}: factors {left.shape} / {right_t.shape}")
    if left.shape[0] != out_f or right_t.shape[0] != in_f:
        raise RuntimeApplyError(
            f"layer {layer_id}: update {left.shape[0]}x{right_t.shape[0]} does not match "
            f"weight {out_f}x{in_f}"
        )
    if not (np.isfinite(left).all() and np.isfinite(right_t).all()):
        raise HealthCheckError(f"layer {layer_id}: non-finite update factors")
    k = left.shape[1]
    if k and k * float(np.abs(left).max()) * float(np.abs(right_t).max()) >= F32_MAX / 2:
        # rare: the cheap bound cannot rule out overflow, so look at the product itself
        if not np.isfinite(left @ right_t.T).all():
            raise HealthCheckError(f"layer {layer_id}: the update overflows float32")
    return left, right_t


def patched_weight_t(
    w0: np.ndarray, factors: Factors | None, out: np.ndarray | None = None
) -> np.ndarray:
    """``(W0 + L @ Rt.T).T`` as a C-contiguous float32 ``in x out`` buffer (``out`` if given).

    ``w0`` is the base weight ``out x in`` (a read-only memmap is fine); it is only read.
    """
    w0t = np.asarray(w0, dtype=np.float32).T
    if out is None:
        out = np.empty(w0t.shape, np.float32)
    np.copyto(out, w0t)
    if factors is not None:
        left, right_t = factors
        if left.shape[1]:
            out += right_t @ left.T
    return out


def lora_feeds(init_name: str, factors: Factors) -> dict[str, np.ndarray]:
    """The two unmerged slot inputs of one weight: ``A = Rt`` (in x k), ``B = L.T`` (k x out)."""
    a_name, b_name = lora_slot_names(init_name)
    left, right_t = factors
    return {a_name: np.ascontiguousarray(right_t), b_name: np.ascontiguousarray(left.T)}


def factors_nbytes(factors: Mapping[int, Factors]) -> int:
    """Memory a cached adapter holds: its low-rank factors only, ``4 * (out + in) * k``."""
    return int(sum(left.nbytes + right_t.nbytes for left, right_t in factors.values()))


@dataclass(frozen=True)
class WeightSlot:
    """One adaptable weight: bundle layer id, graph initializer name, base shape ``(out, in)``."""

    layer_id: int
    init_name: str
    shape: tuple[int, int]
