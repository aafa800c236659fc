"""Per-layer singular bases of ``W0``: float64 SVD on the server, stored in the profile dtype.

The device never runs an SVD (signs and last bits differ across LAPACKs), so the signs
are fixed here: each singular pair is flipped so that the entry of largest magnitude in
its ``U`` column is positive (ties: the first such entry). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solar_edge.errors import ExportError


@dataclass(frozen=True)
class SvdBasis:
    """Top-``R`` singular triplets of ``W0 ~= U @ diag(S) @ V.T`` (float64)."""

    U: np.ndarray  # out x R
    S: np.ndarray  # R, descending
    V: np.ndarray  # in x R

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])


def svd_basis(w0: np.ndarray, rank: int) -> SvdBasis:
    """Float64 SVD of ``w0`` (``out x in``), truncated to ``rank``, with fixed signs."""
    w = np.asarray(w0, dtype=np.float64)
    if w.ndim != 2 or min(w.shape) < 1:
        raise ExportError(f"weight must be a non-empty matrix, got shape {w.shape}")
    if not 1 <= rank <= min(w.shape):
        raise ExportError(f"rank {rank} out of range for a {w.shape} weight")
    if not np.all(np.isfinite(w)):
        raise ExportError("weight has non-finite entries")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    u, s, v = u[:, :rank], s[:rank], vt[:rank].T
    pivot = np.argmax(np.abs(u), axis=0)
    signs = np.where(u[pivot, np.arange(rank)] < 0, -1.0, 1.0)
    return SvdBasis(U=u * signs, S=s.copy(), V=v * signs)


def stored(basis: SvdBasis, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U, V, S)`` as written to the bundle: U and V in ``dtype``, S in float32."""
    np_dtype = np.dtype(dtype)
    return (
        np.ascontiguousarray(basis.U.astype(np_dtype)),
        np.ascontiguousarray(basis.V.astype(np_dtype)),
        basis.S.astype(np.float32),
    )


def reconstruct(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``U @ diag(S) @ V.T`` in float64 (for checks)."""
    return (u.astype(np.float64) * s.astype(np.float64)) @ v.astype(np.float64).T
