"""SOLAR-basis fits of one layer: operating points (bytes, predicted error) per representation.

For one layer update ``dW = B @ A`` and one PRNG variant of its perturbed bases this builds
the candidate points the encoder (:mod:`solar_edge.encode.solar`) allocates bytes over:
sparse coefficients of the least-squares core, rank-``k`` factors inside the bases' span
(coefficient-only), and plain rank-``k`` factors. Errors are predicted from the factors
(truncation + a quantisation-noise estimate); ``dW`` is never formed. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from solar_edge.encode.quant import quantize
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import LAYER_ENTRY_BYTES, positions_nbytes, values_nbytes
from solar_edge.format.records import RecordKind, ValueFormat
from solar_edge.methods.base import LayerUpdate
from solar_edge.regen.bases import perturbed_columns, u_stream, v_stream

if TYPE_CHECKING:
    from solar_edge.encode.solar import CodecConfig

@dataclass
class Option:
    """One operating point of one layer."""

    layer_id: int
    kind: RecordKind | None  # None: layer left out
    variant: int
    size: int  # K coefficients or rank k
    nbytes: int
    err: float  # predicted squared Frobenius error (truncation + quantisation noise)
    fmt: ValueFormat = ValueFormat.FLOAT32


@dataclass
class CoreFit:
    """Least-squares fit of one layer in one PRNG variant (float64).

    ``w_u`` (Ru x m) maps coordinates so that ``U~ @ w_u`` is orthonormal with the span of U~;
    then ``U~^+ = w_u @ w_u.T @ U~.T`` and ``dW`` projected on the spans is
    ``(U~ w_u) M (V~ w_v)^T`` with ``M = gb @ ga``.
    """

    variant: int
    u_t: np.ndarray  # perturbed U~ (out x Ru), exactly the decoder's float32 values
    v_t: np.ndarray
    w_u: np.ndarray
    w_v: np.ndarray
    gb: np.ndarray  # m_u x r
    ga: np.ndarray  # r x m_v
    comp_a: np.ndarray  # factored-core components (Ru x k), decreasing energy
    comp_b: np.ndarray  # (Rv x k)
    comp_energy: np.ndarray  # s_k^2
    in_span: float  # |P_U dW P_V|^2
    core: np.ndarray | None = None  # C (Ru x Rv), only when sparse options are wanted
    gains: np.ndarray | None = None  # flat, per coefficient
    order: np.ndarray | None = None  # flat indices by decreasing gain

    def sparse_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.core is None or self.gains is None or self.order is None:
            raise AssertionError("fit made without sparse arrays")
        return self.core, self.gains, self.order

    def v_pinv_apply(self, x: np.ndarray) -> np.ndarray:
        """``V~^+ @ x`` for ``x`` of shape (in, k)."""
        return self.w_v @ (self.w_v.T @ (self.v_t.T @ x))


def energy(b: np.ndarray, a: np.ndarray) -> float:
    """``|B @ A|_F^2`` from the factors."""
    return float(np.einsum("ij,ji->", b.T @ b, a @ a.T))


def low_rank_svd(left: np.ndarray, right_t: np.ndarray):
    """SVD of ``left @ right_t.T`` (both tall) via QR: returns (Lvecs, s, Rvecs)."""
    q1, r1 = np.linalg.qr(left)
    q2, r2 = np.linalg.qr(right_t)
    p, s, qt = np.linalg.svd(r1 @ r2.T, full_matrices=False)
    return q1 @ p, s, q2 @ qt.T


def dense_components(upd: LayerUpdate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dW = sum_j a_j b_j^T`` by decreasing singular value, entries balanced: (a, b, s)."""
    left, s, right = low_rank_svd(upd.B, upd.A.T)
    t = entry_balance(left.shape[0], right.shape[0])
    root = np.sqrt(s)
    return left * (root * t), right * (root / t), s


def entry_balance(rows: int, cols: int) -> float:
    """Factor scale giving ``a`` and ``b`` the same RMS entry (they share quantisation groups)."""
    return float((rows / cols) ** 0.25)


def orthonormalizer(t: np.ndarray) -> np.ndarray:
    """``W`` with ``t @ W`` orthonormal spanning ``range(t)``: inverse Cholesky factor of the
    Gram matrix (cheap), or its pseudo-inverse square root when ``t`` is (nearly) rank-deficient.
    """
    gram = t.T @ t
    try:
        chol = np.linalg.cholesky(gram)
        diag = np.abs(np.diag(chol))
        if diag.min() > 1e-6 * diag.max():
            return np.linalg.inv(chol).T
    except np.linalg.LinAlgError:
        pass
    lam, vecs = np.linalg.eigh(gram)
    keep = lam > lam.max() * 1e-12
    return vecs[:, keep] / np.sqrt(lam[keep])


def core_fit(upd: LayerUpdate, basis: LayerBasis, cfg: CodecConfig, variant: int,
              sparse: bool) -> CoreFit:
    lid = basis.layer_id
    ru, rv = basis.U.shape[1], basis.V.shape[1]
    u_t = perturbed_columns(basis.U, lid, u_stream(variant), np.arange(ru), cfg.seed,
                            cfg.epsilon, cfg.perturbation).astype(np.float64)
    v_t = perturbed_columns(basis.V, lid, v_stream(variant), np.arange(rv), cfg.seed,
                            cfg.epsilon, cfg.perturbation).astype(np.float64)
    w_u, w_v = orthonormalizer(u_t), orthonormalizer(v_t)
    gb = w_u.T @ (u_t.T @ upd.B)  # m_u x r: dW in orthonormal coordinates is gb @ ga
    ga = (upd.A @ v_t) @ w_v      # r x m_v
    left, s, right = low_rank_svd(gb, ga.T)
    t = entry_balance(ru, rv)
    root = np.sqrt(s)
    fit = CoreFit(variant, u_t, v_t, w_u, w_v, gb, ga, w_u @ (left * (root * t)),
                   w_v @ (right * (root / t)), s**2, energy(gb, ga))
    if sparse:
        fit.core = (w_u @ gb) @ (ga @ w_v.T)  # U~^+ dW V~^+T
        fit.gains = (fit.core**2 * (u_t**2).sum(0)[:, None]
                     * (v_t**2).sum(0)[None, :]).reshape(-1)
        fit.order = np.argsort(-fit.gains, kind="stable")
    return fit


def k_grid(n: int) -> list[int]:
    """1..16, then steps of ~8%, then n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k = k + 1 if k < 16 else max(k + 1, int(k * 1.08))
    return [*ks, n] if n > 0 else []


def sparse_positions(fit: CoreFit, k: int) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Top-k coefficients as (sorted flat positions, rows, cols, (i, j) in that order)."""
    core, _, order = fit.sparse_arrays()
    i, j = np.divmod(order[:k], core.shape[1])
    rows, cols = int(i.max()) + 1, int(j.max()) + 1
    flat = i * cols + j
    srt = np.argsort(flat)
    return flat[srt], rows, cols, np.stack([i[srt], j[srt]])


def quant_noise(values: np.ndarray, fmt: ValueFormat, group_size: int) -> np.ndarray:
    """Squared quantisation error of each value."""
    if fmt == ValueFormat.FLOAT32:
        return np.zeros(values.shape)
    return (quantize(values, fmt, group_size).dequantize().astype(np.float64)
            - values.astype(np.float32).astype(np.float64)) ** 2


def sparse_options(fit: CoreFit, lid: int, e0: float, cfg: CodecConfig,
                    avail: float) -> list[Option]:
    core, gains, order = fit.sparse_arrays()
    n = int(np.count_nonzero(gains))
    cum = np.cumsum(gains[order[:n]])
    floor = max(e0 - fit.in_span, 0.0)
    # gains add up to the in-span energy only for orthonormal bases: rescale so that keeping
    # everything predicts exactly the out-of-span residual
    share = fit.in_span / float(cum[-1]) if n else 0.0
    col_u, col_v = (fit.u_t**2).sum(0), (fit.v_t**2).sum(0)
    opts = []
    for k in k_grid(n):
        pos, _, _, ij = sparse_positions(fit, k)
        pos_bytes = LAYER_ENTRY_BYTES + positions_nbytes(pos)
        if pos_bytes > avail:
            break
        trunc = floor + max(fit.in_span - share * float(cum[k - 1]), 0.0)
        vals = core[ij[0], ij[1]]
        for fmt in cfg.formats:
            nb = pos_bytes + values_nbytes(fmt, k, cfg.group_size)
            if nb <= avail:
                noise = float(quant_noise(vals, fmt, cfg.group_size)
                              @ (col_u[ij[0]] * col_v[ij[1]])) * share
                opts.append(Option(lid, RecordKind.SPARSE_CORE, fit.variant, k, nb,
                                    trunc + noise, fmt))
    return opts


def rank_options(kind: RecordKind, comp_a: np.ndarray, comp_b: np.ndarray,
                  energy: np.ndarray, lid: int, variant: int, e0: float, cfg: CodecConfig,
                  avail: float) -> list[Option]:
    """Rank-k options; quantisation noise of component j ~ energy_j * (rel. noise of a_j + b_j)."""
    kmax = int(np.count_nonzero(energy > energy[0] * 1e-14)) if energy.size else 0
    if cfg.max_rank is not None:
        kmax = min(kmax, cfg.max_rank)
    rows, cols = comp_a.shape[0], comp_b.shape[0]
    cum = np.cumsum(energy)
    opts = []
    for fmt in cfg.formats:
        for k in range(1, kmax + 1):
            nb = LAYER_ENTRY_BYTES + values_nbytes(fmt, (rows + cols) * k, cfg.group_size)
            if nb > avail:
                break
            a, b = comp_a[:, :k], comp_b[:, :k]
            noise = quant_noise(np.concatenate([a.reshape(-1), b.reshape(-1)]), fmt,
                                 cfg.group_size)
            rel = (noise[: rows * k].reshape(rows, k).sum(0) / np.maximum((a**2).sum(0), 1e-300)
                   + noise[rows * k:].reshape(cols, k).sum(0) / np.maximum((b**2).sum(0), 1e-300))
            err = max(e0 - float(cum[k - 1]), 0.0) + float(energy[:k] @ rel)
            opts.append(Option(lid, kind, variant, k, nb, err, fmt))
    return opts
