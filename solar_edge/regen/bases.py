"""Perturbed bases ``U~ = U + eps * P``, generated only for the columns a record uses.

``U`` / ``V`` come from the bundle (singular vectors of ``W0``, float32 views: a
:class:`~solar_edge.format.bundle.LayerBasis`). ``P`` is
regenerated from ``(seed, layer_id, stream)`` with :mod:`solar_edge.regen.prng`;
``stream = 2 * variant`` for U and ``2 * variant + 1`` for V. The arithmetic is fixed:
``float32(U[:, c]) + float32(eps) * P[:, c]`` in float32, so every platform gets the same bits.
"""

from __future__ import annotations

import numpy as np

from solar_edge.errors import CodecError
from solar_edge.format.records import PerturbationKind
from solar_edge.regen.prng import perturbation_columns


def u_stream(variant: int) -> int:
    return 2 * variant


def v_stream(variant: int) -> int:
    return 2 * variant + 1


def perturbed_columns(
    basis_matrix: np.ndarray,
    layer_id: int,
    stream: int,
    columns: np.ndarray,
    seed: int,
    epsilon: float,
    kind: PerturbationKind,
) -> np.ndarray:
    """``basis_matrix[:, columns] + float32(epsilon) * P[:, columns]`` as float32.

    Cost is proportional to ``len(columns)``; with ``epsilon == 0`` no PRNG call is made.
    """
    cols = np.asarray(columns, dtype=np.int64).reshape(-1)
    n_rows, n_cols = basis_matrix.shape
    if cols.size and (cols.min() < 0 or cols.max() >= n_cols):
        raise CodecError(f"basis column out of range 0..{n_cols - 1}")
    # take: a C-ordered gather, ~7x faster than basis_matrix[:, cols] (F-ordered) + a copy
    base = np.take(np.asarray(basis_matrix), cols, axis=1).astype(np.float32, copy=False)
    eps = np.float32(epsilon)
    if not np.isfinite(eps):
        raise CodecError(f"epsilon must be finite, got {epsilon}")
    if eps == 0 or cols.size == 0:
        return np.ascontiguousarray(base)
    p = perturbation_columns(seed, layer_id, stream, n_rows, cols, kind)
    return (base + eps * p).astype(np.float32, copy=False)


def perturbed_leading(
    basis_matrix: np.ndarray,
    layer_id: int,
    stream: int,
    count: int,
    seed: int,
    epsilon: float,
    kind: PerturbationKind,
) -> np.ndarray:
    """The first ``count`` columns, as :func:`perturbed_columns` of ``range(count)``.

    With ``epsilon == 0`` this is a read-only view of ``basis_matrix`` (nothing is copied),
    meant as an operand of a product, not to be kept.
    """
    n_cols = basis_matrix.shape[1]
    if not 0 <= count <= n_cols:
        raise CodecError(f"basis column out of range 0..{n_cols - 1}")
    eps = np.float32(epsilon)
    if eps == 0 and basis_matrix.dtype == np.float32:
        return basis_matrix[:, :count]
    return perturbed_columns(basis_matrix, layer_id, stream, np.arange(count), seed, epsilon,
                             kind)
