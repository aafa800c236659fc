"""Pure numeric patching: what serving an adapter changes in each layer, into new buffers.

Graphs store an adaptable Linear weight transposed (``W0.T``, ``in x out``) as the right
operand of a ``MatMul``. An adapter changes a layer by a :class:`LayerPatch`: low-rank
factors ``(L, Rt)`` with ``dW = L @ Rt.T``, a bias delta, and a row scale (DoRA:
``s = m / |W0 + dW|_row``), so the served layer is ``y = s * ((W0 + dW) x) + b0 + db``.
Everything here reads the pristine base weight (memory-mapped, never written) and writes a
separate buffer, so switching adapters never accumulates error. Cost is ``in * out * k`` for
rank ``k``: proportional to what the packet keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from solar_edge.errors import HealthCheckError, RuntimeApplyError
from solar_edge.format.graph import lora_extra_slot_names, lora_slot_names

F32_MAX = float(np.finfo(np.float32).max)

Factors = tuple[np.ndarray, np.ndarray]  # (L: out x k, Rt: in x k), dW = L @ Rt.T


_BLAS: list[Any] = []  # a threadpoolctl controller, made on first use (None: not installed)


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread inside the block, where threadpoolctl is installed.

    Staging's products are small (``(out + in) x r x k``); a second BLAS thread wakes up and
    then spins for each of them, which on a board's few shared cores costs more than it
    saves (measured in docs/runtime.md). The limit is process-wide while the block runs.
    Without threadpoolctl BLAS keeps its own setting.
    """
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS.append(ThreadpoolController())
        except ImportError:
            _BLAS.append(None)
    if _BLAS[0] is None:
        yield
        return
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield


@dataclass(frozen=True)
class LayerPatch:
    """One layer's change: ``W = diag(scale) (W0 + L @ Rt.T)``, ``b = b0 + bias``."""

    factors: Factors | None = None
    bias: np.ndarray | None = None    # (out,) added to the base bias
    scale: np.ndarray | None = None   # (out,) row scale (DoRA), computed when staged

    @property
    def rank(self) -> int:
        return 0 if self.factors is None else int(self.factors[0].shape[1])


Patches = Mapping[int, LayerPatch]


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
    k = left.shape[1]
    big_l, big_r = (_largest_magnitude(f) for f in (left, right_t))
    if not (math.isfinite(big_l) and math.isfinite(big_r)):
        raise HealthCheckError(f"layer {layer_id}: non-finite update factors")
    if k and k * big_l * big_r >= F32_MAX / 2:
        # rare: the cheap bound cannot rule out overflow, so look at the product itself
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(left @ right_t.T).all()
        if not finite:
            raise HealthCheckError(f"layer {layer_id}: the update overflows float32")
    return left, right_t


def _largest_magnitude(a: np.ndarray) -> float:
    """``max |a|`` (0 when empty) from ``a.max()`` and ``a.min()``, without an ``|a|``
    temporary; inf when ``a`` holds a NaN or an infinity (both reductions propagate NaN)."""
    if a.size == 0:
        return 0.0
    high, low = float(a.max()), float(a.min())
    return max(high, -low) if math.isfinite(high) and math.isfinite(low) else math.inf


def dora_scale(w0: np.ndarray, factors: Factors | None, base_norms: np.ndarray,
               magnitude_delta: np.ndarray) -> np.ndarray:
    """``(|W0|_row + d) / |W0 + L Rt^T|_row`` from factors (``dW`` is never formed):
    ``|w0 + dw|^2 = |w0|^2 + 2 (W0 Rt)_i . L_i + L_i (Rt^T Rt) L_i^T`` per row ``i``."""
    sq = base_norms.astype(np.float64) ** 2
    if factors is not None and factors[0].shape[1]:
        left, right_t = (np.asarray(f, np.float64) for f in factors)
        cross = ((np.asarray(w0, np.float64) @ right_t) * left).sum(axis=1)
        sq = sq + 2 * cross + ((left @ (right_t.T @ right_t)) * left).sum(axis=1)
    norms = np.sqrt(np.maximum(sq, 0.0))
    magnitude = base_norms.astype(np.float64) + magnitude_delta.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms > 0, magnitude / norms, 0.0)
    if not np.isfinite(scale).all():
        raise HealthCheckError("DoRA row scale is not finite")
    return scale.astype(np.float32)


MAX_GROWTH = 8.0  # an update larger than this next to its base layer gets a forward probe


def within_growth(patch: LayerPatch, sigma1: float, bias_scale: float) -> bool:
    """Whether ``patch`` is small next to its base layer: ``|L|_F |Rt|_F`` (a bound on
    ``|dW|_2``) at most ``MAX_GROWTH`` times ``W0``'s largest singular value, row scales at
    most ``MAX_GROWTH`` and bias deltas at most ``MAX_GROWTH * (1 + max |b0|)``
    (``bias_scale`` is ``max |b0|``, 0 without a base bias).

    Trained adapters are far inside this (a LoRA's ``|dW|_2`` is a fraction of ``W0``'s).
    Finite factors whose product still overflows an activation to inf are far outside it:
    for them the runtime runs the forward probe (``runtime/checks.py:StagingChecks.run``)."""
    if patch.factors is not None:
        with np.errstate(over="ignore"):  # a norm that overflows is far outside the bound
            bound = math.prod(math.sqrt(float(np.vdot(f, f))) for f in patch.factors)
        if not bound <= MAX_GROWTH * sigma1:
            return False
    if patch.scale is not None and not _largest_magnitude(patch.scale) <= MAX_GROWTH:
        return False
    if patch.bias is not None and not _largest_magnitude(patch.bias) <= MAX_GROWTH * (
            1.0 + bias_scale):
        return False
    return True


def patched_weight_t(w0: np.ndarray, patch: LayerPatch | None,
                     out: np.ndarray | None = None) -> np.ndarray:
    """``(diag(s) (W0 + L @ Rt.T)).T`` as a C-contiguous float32 ``in x out`` buffer.

    ``w0`` is the base weight ``out x in`` (a read-only memmap is fine); it is only read.
    """
    w0t = np.asarray(w0, dtype=np.float32).T
    if out is None:
        out = np.empty(w0t.shape, np.float32)
    if patch is not None and patch.factors is not None and patch.factors[0].shape[1]:
        left, right_t = patch.factors
        np.matmul(right_t, left.T, out=out)  # the product straight into the buffer, then
        out += w0t                           # W0.T added: no temporary (same bits: a + b)
    else:
        np.copyto(out, w0t)
    if patch is not None and patch.scale is not None:
        out *= patch.scale[None, :]
    return out


def patched_bias(b0: np.ndarray, patch: LayerPatch | None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """``b0 + bias`` into a float32 buffer (``out`` if given); ``b0`` is only read."""
    if out is None:
        out = np.empty(b0.shape, np.float32)
    np.copyto(out, b0)
    if patch is not None and patch.bias is not None:
        out += patch.bias
    return out


def lora_feeds(init_name: str, patch: LayerPatch) -> dict[str, np.ndarray]:
    """The unmerged slot inputs of one weight: ``A = Rt`` (in x k), ``B = L.T`` (k x out),
    and the row scale and bias delta where the patch has them (else the graph's defaults)."""
    feeds: dict[str, np.ndarray] = {}
    if patch.factors is not None:
        a_name, b_name = lora_slot_names(init_name)
        left, right_t = patch.factors
        feeds[a_name], feeds[b_name] = np.ascontiguousarray(right_t), np.ascontiguousarray(left.T)
    scale_name, bias_name = lora_extra_slot_names(init_name)
    if patch.scale is not None:
        feeds[scale_name] = np.ascontiguousarray(patch.scale, np.float32)
    if patch.bias is not None:
        feeds[bias_name] = np.ascontiguousarray(patch.bias, np.float32)
    return feeds


def slot_patches(slots: Iterable[WeightSlot], feeds: Mapping[str, np.ndarray]
                 ) -> dict[int, LayerPatch]:
    """The patches slot ``feeds`` (:func:`lora_feeds`) serve, read back from the feeds."""
    patches = {}
    for slot in slots:
        a_name, b_name = lora_slot_names(slot.init_name)
        scale_name, bias_name = lora_extra_slot_names(slot.init_name)
        if a_name in feeds or scale_name in feeds or bias_name in feeds:
            factors = (feeds[b_name].T, feeds[a_name]) if a_name in feeds else None
            patches[slot.layer_id] = LayerPatch(factors, feeds.get(bias_name),
                                                feeds.get(scale_name))
    return patches


def patches_nbytes(patches: Patches) -> int:
    """Memory a cached adapter holds: factors ``4 * (out + in) * k`` plus its vectors."""
    total = 0
    for p in patches.values():
        if p.factors is not None:
            total += p.factors[0].nbytes + p.factors[1].nbytes
        total += sum(v.nbytes for v in (p.bias, p.scale) if v is not None)
    return int(total)


@dataclass(frozen=True)
class WeightSlot:
    """One adaptable weight: bundle layer id, graph initializer names, base shape."""

    layer_id: int
    init_name: str
    shape: tuple[int, int]
    bias_name: str | None = None  # the patchable bias initializer, if any
