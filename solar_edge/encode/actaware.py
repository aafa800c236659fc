"""Activation-aware low-rank, low-bit fits of one layer update (pure numpy).

Distortion of an approximation ``dW_hat = L @ Rt.T`` of ``dW = B @ A`` on calibration inputs
``X`` (tokens x in) is ``|(dW - dW_hat) X^T|_F^2 = tr(E G E^T)`` with ``G = X^T X / tokens``
the layer's input Gram matrix; ``G = I`` gives the plain squared Frobenius error. With an
output-side Gram ``Gamma`` (second moment of the loss gradient at the layer's outputs) the
distortion ``tr(Gamma E G E^T)`` is the K-FAC estimate of the loss increase, comparable
across layers. Everything is computed from factors, ``dW`` is never formed.

A fit of rank ``k`` at ``b`` bits:

1. whitened truncation: the best rank-``k`` approximation in the ``G``-norm is the SVD of
   ``dW S`` (``S = G^(1/2)``), mapped back with ``S^-1``;
2. quantise the left factor, re-solve the right one for it (``Rt^T = pinv(L_q) dW``, optimal
   in any ``G``-norm), quantise it, re-solve the left one in the ``G``-norm
   (``L = dW G Rt (Rt^T G Rt)^-1``), quantise; keep the best measured round.

Each fit is returned as the exact :class:`~solar_edge.format.records.LayerRecord` the packet carries
and is scored on the dequantised values the device decodes, so the distortion is measured,
not predicted. Records are ``DENSE_FACTORS`` (plain factors) or ``FACTORED_CORE`` (the same
factors as coordinates in the bundle's singular bases of ``W0``, ``epsilon = 0``: coefficient
only); :func:`fit_layer` tries both and the allocator keeps whichever measures better.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from solar_edge.decode import decode_factors
from solar_edge.encode.quant import best_quantize
from solar_edge.errors import CodecError
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import record_nbytes
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    RecordKind,
    ValueFormat,
)
from solar_edge.methods.base import LayerUpdate

REFIT_ROUNDS = 2


@dataclass(frozen=True)
class Whitener:
    """``G`` and its symmetric square root ``S`` and inverse (ridge-regularised)."""

    gram: np.ndarray
    sqrt: np.ndarray
    inv_sqrt: np.ndarray

    @classmethod
    def from_gram(cls, gram: np.ndarray | None, n: int, ridge: float = 1e-4) -> Whitener:
        """``gram=None`` is the identity (plain Frobenius). ``ridge`` is relative to the mean
        eigenvalue, so directions the calibration never excites still count a little."""
        if gram is None:
            eye = np.eye(n)
            return cls(eye, eye, eye)
        g = np.asarray(gram, np.float64)
        if g.shape != (n, n) or not np.all(np.isfinite(g)):
            raise CodecError(f"Gram matrix must be finite {n}x{n}, got {g.shape}")
        g = (g + g.T) / 2
        lam, vec = np.linalg.eigh(g)
        lam = np.maximum(lam, 0) + ridge * max(float(lam.mean()), 1e-30)
        g = (vec * lam) @ vec.T
        return cls(g, (vec * np.sqrt(lam)) @ vec.T, (vec / np.sqrt(lam)) @ vec.T)


def weighted_sq_error(B: np.ndarray, A: np.ndarray, L: np.ndarray, Rt: np.ndarray,
                      gram: np.ndarray, left: np.ndarray | None = None) -> float:
    """``tr(Gamma E G E^T)`` for ``E = B A - L Rt^T`` (``Gamma = left``, identity if None),
    from factors only."""
    ag = A @ gram
    gb, gl = (B, L) if left is None else (left @ B, left @ L)
    t1 = np.einsum("ij,ji->", B.T @ gb, ag @ A.T)
    t2 = np.einsum("ij,ji->", L.T @ gb, ag @ Rt)
    t3 = np.einsum("ij,ji->", L.T @ gl, Rt.T @ gram @ Rt)
    return float(max(t1 - 2 * t2 + t3, 0.0))


def update_energy(upd: LayerUpdate, gram: np.ndarray, left: Whitener | None = None) -> float:
    """``tr(Gamma dW G dW^T)``: the distortion of leaving the layer out."""
    B, A = np.asarray(upd.B, np.float64), np.asarray(upd.A, np.float64)
    gb = B if left is None else left.gram @ B
    return float(np.einsum("ij,ji->", B.T @ gb, A @ gram @ A.T))


def whitened_factors(B: np.ndarray, A: np.ndarray, w: Whitener, k: int,
                     left: Whitener | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``k`` ``(L, Rt)`` of ``B A`` in the ``(Gamma, G)``-norm, energy split evenly."""
    q1, r1 = np.linalg.qr(B if left is None else left.sqrt @ B)
    q2, r2 = np.linalg.qr((A @ w.sqrt).T)
    p, s, qt = np.linalg.svd(r1 @ r2.T, full_matrices=False)
    k = min(k, s.size)
    root = np.sqrt(s[:k])
    lf = (q1 @ p[:, :k]) * root
    return (lf if left is None else left.inv_sqrt @ lf), w.inv_sqrt @ ((q2 @ qt.T[:, :k]) * root)


@dataclass(frozen=True)
class LayerFit:
    """One operating point of one layer: the record and its distortion. ``err`` is what the
    allocation weighs; ``full_err``, where set, the measured distortion when ``err`` weighs
    its quantisation part less (:func:`discounted`)."""

    layer_id: int
    rank: int
    bits: int
    kind: RecordKind | None  # None: layer left out
    nbytes: int
    err: float               # tr(E G E^T) after quantisation
    record: LayerRecord | None = None
    full_err: float | None = None

    @property
    def distortion(self) -> float:
        """The measured distortion, whatever the allocation weighs."""
        return self.err if self.full_err is None else self.full_err


def _q(values: np.ndarray, fmt: ValueFormat, group: int) -> np.ndarray:
    return best_quantize(values.reshape(-1), fmt, group).dequantize().astype(np.float64)


def _coords(kind: RecordKind, basis: LayerBasis | None):
    """Maps between full factors and what the record stores (identity or basis coordinates)."""
    if kind == RecordKind.DENSE_FACTORS or basis is None:
        return (lambda x: x), (lambda x: x), (lambda c: c), (lambda c: c)
    U, V = basis.U.astype(np.float64), basis.V.astype(np.float64)
    return (lambda x: U.T @ x), (lambda x: V.T @ x), (lambda c: U @ c), (lambda c: V @ c)


def quantized_fit(upd: LayerUpdate, lid: int, w: Whitener, k: int, fmt: ValueFormat,
                  group: int, kind: RecordKind, basis: LayerBasis | None,
                  start: tuple[np.ndarray, np.ndarray] | None = None,
                  left: Whitener | None = None) -> LayerFit:
    """Rank-``k`` fit at ``fmt`` with alternating quantised refits (see module docstring).

    ``start``: the whitened factors of rank >= ``k`` when the caller already has them."""
    B, A = np.asarray(upd.B, np.float64), np.asarray(upd.A, np.float64)
    to_l, to_r, from_l, from_r = _coords(kind, basis)
    L, Rt = start if start is not None else whitened_factors(B, A, w, k, left)
    gam = None if left is None else left.gram
    L, Rt = L[:, :k], Rt[:, :k]
    k = L.shape[1]
    cl, cr = to_l(L), to_r(Rt)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(REFIT_ROUNDS):
        lq = from_l(_q(cl, fmt, group).reshape(cl.shape))
        glq = lq if gam is None else gam @ lq              # optimal right factor for lq
        rt = (np.linalg.pinv(lq.T @ glq) @ (glq.T @ B) @ A).T
        cr_q = _q(to_r(rt), fmt, group).reshape(cr.shape)
        rq = from_r(cr_q)
        cand = _q(cl, fmt, group).reshape(cl.shape)
        err = weighted_sq_error(B, A, lq, rq, w.gram, gam)
        if best is None or err < best[0]:
            best = (err, cand, cr_q)
        gram_r = rq.T @ w.gram @ rq                         # left refit in the G-norm
        L = B @ (A @ w.gram @ rq) @ np.linalg.pinv(gram_r)
        cl = to_l(L)
    assert best is not None
    rows, cols = best[1].shape[0], best[2].shape[0]
    values = best_quantize(np.concatenate([best[1].reshape(-1), best[2].reshape(-1)]), fmt, group)
    record = LayerRecord(lid, kind, rows, cols, k, values)
    lf, rf = decode_factors(record, basis if kind == RecordKind.FACTORED_CORE else None,
                            CodecHeader(seed=0))
    err = weighted_sq_error(B, A, lf.astype(np.float64), rf.astype(np.float64), w.gram, gam)
    return LayerFit(lid, k, fmt.bits, kind, record_nbytes(record), err, record)


def own_factor_fit(upd: LayerUpdate, lid: int, w: Whitener, fmt: ValueFormat, group: int,
                   left: Whitener | None = None) -> LayerFit:
    """The adapter's own factors ``B``, ``A`` quantised as they are (entries balanced so both
    share the quantisation grid): the plain "LoRA at b bits" operating point, full rank."""
    B, A = np.asarray(upd.B, np.float64), np.asarray(upd.A, np.float64)
    t = float(np.sqrt(np.sqrt((A * A).mean()) / max(np.sqrt((B * B).mean()), 1e-30)))
    values = best_quantize(np.concatenate([(B * t).reshape(-1), (A.T / t).reshape(-1)]),
                           fmt, group)
    record = LayerRecord(lid, RecordKind.DENSE_FACTORS, B.shape[0], A.shape[1], B.shape[1],
                         values)
    lf, rf = decode_factors(record, None, CodecHeader(seed=0))
    err = weighted_sq_error(B, A, lf.astype(np.float64), rf.astype(np.float64), w.gram,
                            None if left is None else left.gram)
    return LayerFit(lid, B.shape[1], fmt.bits, RecordKind.DENSE_FACTORS, record_nbytes(record),
                    err, record)


def discounted(fit: LayerFit, truncation: float, quant_weight: float) -> LayerFit:
    """``fit`` with its distortion split into what rank truncation leaves (``truncation``)
    and what quantisation adds, the latter weighed by ``quant_weight`` (1: unchanged)."""
    if quant_weight == 1.0:
        return fit
    return replace(fit, err=truncation + quant_weight * max(fit.err - truncation, 0.0),
                   full_err=fit.err)


def fit_layer(upd: LayerUpdate, lid: int, w: Whitener, *, max_rank: int,
              formats: tuple[ValueFormat, ...], group: int,
              basis: LayerBasis | None, left: Whitener | None = None,
              quant_weight: float = 1.0) -> list[LayerFit]:
    """Every operating point of one layer: 'left out', then rank x bits x representation,
    then the adapter's own factors at each width when its rank is above ``max_rank``.

    The representation is chosen per point by measured distortion (ties: plain factors).
    ``quant_weight`` weighs the quantisation part of each point's distortion
    (:func:`discounted`)."""
    e0 = update_energy(upd, w.gram, left)
    fits = [LayerFit(lid, 0, 0, None, 0, e0)]
    rank_cap = min(max_rank, upd.B.shape[1], upd.B.shape[0], upd.A.shape[1])
    kinds = [RecordKind.DENSE_FACTORS]
    if basis is not None:
        kinds.append(RecordKind.FACTORED_CORE)
    B, A = np.asarray(upd.B, np.float64), np.asarray(upd.A, np.float64)
    start = whitened_factors(B, A, w, rank_cap, left) if rank_cap else None
    gam = None if left is None else left.gram
    for k in range(1, rank_cap + 1):
        assert start is not None
        trunc = weighted_sq_error(B, A, start[0][:, :k], start[1][:, :k], w.gram, gam) \
            if quant_weight != 1.0 else 0.0
        for fmt in formats:
            cands = [quantized_fit(upd, lid, w, k, fmt, group, kind, basis, start, left)
                     for kind in kinds]
            fits.append(discounted(min(cands, key=lambda f: (f.err, f.nbytes, f.kind)),
                                   trunc, quant_weight))
    r = upd.B.shape[1]
    if max_rank < r <= min(upd.B.shape[0], upd.A.shape[1]):
        fits += [discounted(own_factor_fit(upd, lid, w, fmt, group, left), 0.0, quant_weight)
                 for fmt in formats]
    return fits
