"""SOLAR codec: LoRA updates -> per-layer records under one global byte budget, and back.

Encoding works on the LoRA factors only (``dW = B @ A`` is never formed). Per layer and PRNG
variant it builds candidate operating points (bytes, predicted squared error) for each
representation (see :mod:`solar_edge.format.records`):

* ``sparse_core``: least-squares core ``C = U~^+ dW V~^+T`` (from QR of the perturbed bases),
  keep the K coefficients of largest ``c_ij^2 |u~_i|^2 |v~_j|^2``;
* ``factored_core``: best rank-k approximation of ``dW`` inside ``span(U~) x span(V~)``,
  written as core factors in basis coordinates;
* ``dense_factors``: rank-k truncation of ``dW`` as plain factors.

A global greedy on each layer's lower convex hull (largest error reduction per byte first),
then a fill pass, picks one point per layer with ``overhead + sum(record bytes) <= budget``.
The chosen records are quantised, and each layer's reconstruction is produced by
:func:`decode_factors` on the quantised record, so the device decodes the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from solar_edge.decode import decode_factors
from solar_edge.encode.greedy import allocate_greedy
from solar_edge.encode.quant import quantize
from solar_edge.errors import BudgetError, CodecError
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import (
    DEFAULT_PACKET_OVERHEAD,
    LAYER_ENTRY_BYTES,
    MAX_LAYER_ID,
    positions_nbytes,
    record_nbytes,
    values_nbytes,
)
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)
from solar_edge.methods.base import LayerUpdate
from solar_edge.regen.bases import perturbed_columns, u_stream, v_stream

REPRESENTATIONS = ("sparse_core", "factored_core", "dense_factors", "auto")
_KIND_OF = {
    "sparse_core": (RecordKind.SPARSE_CORE,),
    "factored_core": (RecordKind.FACTORED_CORE,),
    "dense_factors": (RecordKind.DENSE_FACTORS,),
    "auto": (RecordKind.SPARSE_CORE, RecordKind.FACTORED_CORE, RecordKind.DENSE_FACTORS),
}


@dataclass(frozen=True)
class CodecConfig:
    """Encoder parameters. ``budget_bytes=None``: per layer the option of lowest predicted error
    (a layer is left out only when every option is predicted worse than no update)."""

    seed: int = 0                     # u64 PRNG seed shared by all layers
    epsilon: float = 0.0              # perturbation scale (stored as float32)
    perturbation: PerturbationKind = PerturbationKind.RADEMACHER
    value_format: ValueFormat | tuple[ValueFormat, ...] = ValueFormat.INT8  # tuple: pick per layer
    group_size: int = 64              # values per float16 scale (integer formats)
    budget_bytes: int | None = None   # whole packet, including overhead_bytes
    representation: str = "auto"      # one of REPRESENTATIONS
    max_rank: int | None = None       # cap on k for factored_core / dense_factors
    variants: int = 1                 # PRNG variants tried per layer (seed search)
    overhead_bytes: int = DEFAULT_PACKET_OVERHEAD  # header + metadata + signature
    refit_limit: int = 512            # re-solve sparse coefficients jointly up to this K

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**64:
            raise CodecError(f"seed must fit in 64 bits, got {self.seed}")
        if not (np.isfinite(self.epsilon) and self.epsilon >= 0):
            raise CodecError(f"epsilon must be finite and >= 0, got {self.epsilon}")
        if self.representation not in REPRESENTATIONS:
            raise CodecError(f"representation must be one of {REPRESENTATIONS}")
        if not 1 <= self.group_size <= 0xFFFF:
            raise CodecError(f"group_size must be in 1..65535, got {self.group_size}")
        if not 1 <= self.variants <= 256:
            raise CodecError(f"variants must be in 1..256, got {self.variants}")
        if self.max_rank is not None and self.max_rank < 1:
            raise CodecError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise CodecError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if self.overhead_bytes < 0:
            raise CodecError("overhead_bytes must be >= 0")
        fmts = self.value_format if isinstance(self.value_format, tuple) else (self.value_format,)
        if not fmts:
            raise CodecError("value_format needs at least one format")
        try:
            fmts = tuple(ValueFormat(f) for f in fmts)
        except ValueError as exc:
            raise CodecError(f"unknown value format: {exc}") from exc
        object.__setattr__(self, "value_format", fmts[0] if len(fmts) == 1 else fmts)
        object.__setattr__(self, "perturbation", PerturbationKind(self.perturbation))

    @property
    def formats(self) -> tuple[ValueFormat, ...]:
        """Candidate value formats (the allocator picks one per layer)."""
        vf = self.value_format
        return vf if isinstance(vf, tuple) else (vf,)


@dataclass(frozen=True)
class EncodeResult:
    header: CodecHeader
    records: list[LayerRecord]
    reconstructions: dict[int, tuple[np.ndarray, np.ndarray]]  # exactly what decode gives
    predicted_error: dict[int, float]  # relative Frobenius error of each reconstruction
    layer_bytes: dict[int, int] = field(default_factory=dict)
    payload_bytes: int = 0             # sum of record sizes
    total_bytes: int = 0               # payload + overhead_bytes


# --- fitting ---------------------------------------------------------------------------------


@dataclass
class _Option:
    """One operating point of one layer."""

    layer_id: int
    kind: RecordKind | None  # None: layer left out
    variant: int
    size: int  # K coefficients or rank k
    nbytes: int
    err: float  # predicted squared Frobenius error (truncation + quantisation noise)
    fmt: ValueFormat = ValueFormat.FLOAT32


@dataclass
class _CoreFit:
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


def _energy(b: np.ndarray, a: np.ndarray) -> float:
    """``|B @ A|_F^2`` from the factors."""
    return float(np.einsum("ij,ji->", b.T @ b, a @ a.T))


def _low_rank_svd(left: np.ndarray, right_t: np.ndarray):
    """SVD of ``left @ right_t.T`` (both tall) via QR: returns (Lvecs, s, Rvecs)."""
    q1, r1 = np.linalg.qr(left)
    q2, r2 = np.linalg.qr(right_t)
    p, s, qt = np.linalg.svd(r1 @ r2.T, full_matrices=False)
    return q1 @ p, s, q2 @ qt.T


def _dense_components(upd: LayerUpdate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dW = sum_j a_j b_j^T`` by decreasing singular value, entries balanced: (a, b, s)."""
    left, s, right = _low_rank_svd(upd.B, upd.A.T)
    t = _entry_balance(left.shape[0], right.shape[0])
    root = np.sqrt(s)
    return left * (root * t), right * (root / t), s


def _entry_balance(rows: int, cols: int) -> float:
    """Factor scale giving ``a`` and ``b`` the same RMS entry (they share quantisation groups)."""
    return float((rows / cols) ** 0.25)


def _orthonormalizer(t: np.ndarray) -> np.ndarray:
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


def _core_fit(upd: LayerUpdate, basis: LayerBasis, cfg: CodecConfig, variant: int,
              sparse: bool) -> _CoreFit:
    lid = basis.layer_id
    ru, rv = basis.U.shape[1], basis.V.shape[1]
    u_t = perturbed_columns(basis.U, lid, u_stream(variant), np.arange(ru), cfg.seed,
                            cfg.epsilon, cfg.perturbation).astype(np.float64)
    v_t = perturbed_columns(basis.V, lid, v_stream(variant), np.arange(rv), cfg.seed,
                            cfg.epsilon, cfg.perturbation).astype(np.float64)
    w_u, w_v = _orthonormalizer(u_t), _orthonormalizer(v_t)
    gb = w_u.T @ (u_t.T @ upd.B)  # m_u x r: dW in orthonormal coordinates is gb @ ga
    ga = (upd.A @ v_t) @ w_v      # r x m_v
    left, s, right = _low_rank_svd(gb, ga.T)
    t = _entry_balance(ru, rv)
    root = np.sqrt(s)
    fit = _CoreFit(variant, u_t, v_t, w_u, w_v, gb, ga, w_u @ (left * (root * t)),
                   w_v @ (right * (root / t)), s**2, _energy(gb, ga))
    if sparse:
        fit.core = (w_u @ gb) @ (ga @ w_v.T)  # U~^+ dW V~^+T
        fit.gains = (fit.core**2 * (u_t**2).sum(0)[:, None]
                     * (v_t**2).sum(0)[None, :]).reshape(-1)
        fit.order = np.argsort(-fit.gains, kind="stable")
    return fit


def _k_grid(n: int) -> list[int]:
    """1..16, then steps of ~8%, then n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k = k + 1 if k < 16 else max(k + 1, int(k * 1.08))
    return [*ks, n] if n > 0 else []


def _sparse_positions(fit: _CoreFit, k: int) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Top-k coefficients as (sorted flat positions, rows, cols, (i, j) in that order)."""
    core, _, order = fit.sparse_arrays()
    i, j = np.divmod(order[:k], core.shape[1])
    rows, cols = int(i.max()) + 1, int(j.max()) + 1
    flat = i * cols + j
    srt = np.argsort(flat)
    return flat[srt], rows, cols, np.stack([i[srt], j[srt]])


def _quant_noise(values: np.ndarray, fmt: ValueFormat, group_size: int) -> np.ndarray:
    """Squared quantisation error of each value."""
    if fmt == ValueFormat.FLOAT32:
        return np.zeros(values.shape)
    return (quantize(values, fmt, group_size).dequantize().astype(np.float64)
            - values.astype(np.float32).astype(np.float64)) ** 2


def _sparse_options(fit: _CoreFit, lid: int, e0: float, cfg: CodecConfig,
                    avail: float) -> list[_Option]:
    core, gains, order = fit.sparse_arrays()
    n = int(np.count_nonzero(gains))
    cum = np.cumsum(gains[order[:n]])
    floor = max(e0 - fit.in_span, 0.0)
    # gains add up to the in-span energy only for orthonormal bases: rescale so that keeping
    # everything predicts exactly the out-of-span residual
    share = fit.in_span / float(cum[-1]) if n else 0.0
    col_u, col_v = (fit.u_t**2).sum(0), (fit.v_t**2).sum(0)
    opts = []
    for k in _k_grid(n):
        pos, _, _, ij = _sparse_positions(fit, k)
        pos_bytes = LAYER_ENTRY_BYTES + positions_nbytes(pos)
        if pos_bytes > avail:
            break
        trunc = floor + max(fit.in_span - share * float(cum[k - 1]), 0.0)
        vals = core[ij[0], ij[1]]
        for fmt in cfg.formats:
            nb = pos_bytes + values_nbytes(fmt, k, cfg.group_size)
            if nb <= avail:
                noise = float(_quant_noise(vals, fmt, cfg.group_size)
                              @ (col_u[ij[0]] * col_v[ij[1]])) * share
                opts.append(_Option(lid, RecordKind.SPARSE_CORE, fit.variant, k, nb,
                                    trunc + noise, fmt))
    return opts


def _rank_options(kind: RecordKind, comp_a: np.ndarray, comp_b: np.ndarray,
                  energy: np.ndarray, lid: int, variant: int, e0: float, cfg: CodecConfig,
                  avail: float) -> list[_Option]:
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
            noise = _quant_noise(np.concatenate([a.reshape(-1), b.reshape(-1)]), fmt,
                                 cfg.group_size)
            rel = (noise[: rows * k].reshape(rows, k).sum(0) / np.maximum((a**2).sum(0), 1e-300)
                   + noise[rows * k:].reshape(cols, k).sum(0) / np.maximum((b**2).sum(0), 1e-300))
            err = max(e0 - float(cum[k - 1]), 0.0) + float(energy[:k] @ rel)
            opts.append(_Option(lid, kind, variant, k, nb, err, fmt))
    return opts


def _check_inputs(updates: dict[int, LayerUpdate], bases: dict[int, LayerBasis]) -> None:
    for lid, upd in updates.items():
        if not 0 <= lid <= MAX_LAYER_ID:
            raise CodecError(f"layer id {lid} out of the packet's range 0..{MAX_LAYER_ID}")
        if lid not in bases:
            raise CodecError(f"layer {lid} ({upd.name}): no basis")
        basis = bases[lid]
        b, a = np.asarray(upd.B), np.asarray(upd.A)
        if basis.layer_id != lid:
            raise CodecError(f"layer {lid}: basis is for layer {basis.layer_id}")
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise CodecError(f"layer {lid} ({upd.name}): B {b.shape} and A {a.shape} "
                             "are not factors of one product")
        if b.shape[0] != basis.out_features or a.shape[1] != basis.in_features:
            raise CodecError(f"layer {lid} ({upd.name}): update {b.shape[0]}x{a.shape[1]} does "
                             f"not match basis {basis.out_features}x{basis.in_features}")
        if not (np.all(np.isfinite(b)) and np.all(np.isfinite(a))):
            raise CodecError(f"layer {lid} ({upd.name}): non-finite factors")


# --- allocation ------------------------------------------------------------------------------


def _allocate(pools: dict[int, list[_Option]], avail: int | None) -> dict[int, _Option]:
    """One option per layer: min error if no budget, else greedy by error drop per byte."""
    if avail is None:
        chosen = {}
        for lid, opts in pools.items():
            best = min(o.err for o in opts)
            tol = 1e-12 * max(opts[0].err, 1e-300)
            chosen[lid] = min((o for o in opts if o.err <= best + tol), key=lambda o: o.nbytes)
        return chosen
    # opts[0] is 'left out'
    return allocate_greedy(pools, {lid: opts[0] for lid, opts in pools.items()}, avail)


# --- building records ------------------------------------------------------------------------


def _refit_sparse(fit: _CoreFit, ij: np.ndarray, upd: LayerUpdate) -> np.ndarray:
    """Jointly least-squares coefficients for a fixed support (non-orthogonal bases)."""
    ui, vj = fit.u_t[:, ij[0]], fit.v_t[:, ij[1]]
    gram = (ui.T @ ui) * (vj.T @ vj)
    rhs = np.einsum("kr,rk->k", ui.T @ upd.B, upd.A @ vj)
    try:
        return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def _build_records(opt: _Option, upd: LayerUpdate, fit: _CoreFit | None, cfg: CodecConfig,
                   out_in: tuple[int, int]) -> list[LayerRecord]:
    """Candidate records of the same size for one chosen option (the caller keeps the best)."""
    eps = float(np.float32(cfg.epsilon))

    def q(v: np.ndarray) -> QuantizedValues:
        return quantize(v, opt.fmt, cfg.group_size)

    if opt.kind == RecordKind.SPARSE_CORE:
        assert fit is not None
        pos, rows, cols, ij = _sparse_positions(fit, opt.size)
        vals = fit.sparse_arrays()[0][ij[0], ij[1]]
        if eps != 0 and opt.size <= cfg.refit_limit:
            vals = _refit_sparse(fit, ij, upd)
        return [LayerRecord(opt.layer_id, RecordKind.SPARSE_CORE, rows, cols, 0, q(vals),
                            positions=pos.astype(np.uint32), variant=opt.variant, epsilon=eps)]
    k = opt.size
    if opt.kind == RecordKind.FACTORED_CORE:
        assert fit is not None
        a, b = fit.comp_a[:, :k], fit.comp_b[:, :k]
        rows, cols = a.shape[0], b.shape[0]
        left_basis, right_pinv = fit.u_t, fit.v_pinv_apply
    else:
        dense_a, dense_b, _ = _dense_components(upd)
        a, b = dense_a[:, :k], dense_b[:, :k]
        rows, cols = out_in
        left_basis, right_pinv = None, None
        eps = 0.0

    kind = opt.kind
    assert kind is not None

    def record(a: np.ndarray, b: np.ndarray) -> LayerRecord:
        values = q(np.concatenate([a.reshape(-1), b.reshape(-1)]))
        return LayerRecord(opt.layer_id, kind, rows, cols, k, values,
                           variant=opt.variant, epsilon=eps)

    plain = record(a, b)
    if opt.fmt == ValueFormat.FLOAT32:
        return [plain]
    # quantisation-aware: keep the quantised left factor, re-solve the right one for it
    a_q = plain.values.dequantize()[: rows * k].reshape(rows, k).astype(np.float64)
    l_q = a_q if left_basis is None else left_basis @ a_q
    target = upd.A.T @ (np.linalg.pinv(l_q) @ upd.B).T  # in x k: argmin |dW - l_q T^T|
    b_new = target if right_pinv is None else right_pinv(target)
    return [plain, record(a, b_new)]


def _rel_error(upd: LayerUpdate, lf: np.ndarray, rt: np.ndarray, e0: float) -> float:
    """``|B A - L Rt^T|_F / |B A|_F`` from factors only."""
    if e0 == 0:
        return 0.0
    lf, rt = lf.astype(np.float64), rt.astype(np.float64)
    cross = float(np.einsum("ij,ji->", upd.B.T @ lf, rt.T @ upd.A.T))
    err = e0 - 2 * cross + _energy(lf, rt.T)
    return float(np.sqrt(max(err, 0.0) / e0))


def encode(
    updates: dict[int, LayerUpdate],
    bases: dict[int, LayerBasis],
    config: CodecConfig,
) -> EncodeResult:
    """Fit, budget and quantise every layer; see the module docstring."""
    _check_inputs(updates, bases)
    header = CodecHeader(seed=config.seed, perturbation=config.perturbation)
    avail = None
    if config.budget_bytes is not None:
        avail = config.budget_bytes - config.overhead_bytes
    kinds = _KIND_OF[config.representation]
    n_variants = config.variants if config.epsilon != 0 else 1
    f64 = {lid: LayerUpdate(u.name, np.asarray(u.B, np.float64), np.asarray(u.A, np.float64))
           for lid, u in updates.items()}
    cap = float("inf") if avail is None else max(avail, 0)
    pools: dict[int, list[_Option]] = {}
    fits: dict[tuple[int, int], _CoreFit] = {}
    e0s: dict[int, float] = {}
    for lid, upd in sorted(f64.items()):
        basis = bases[lid]
        e0 = e0s[lid] = _energy(upd.B, upd.A)
        pool = [_Option(lid, None, 0, 0, 0, e0)]
        if e0 > 0:
            if RecordKind.SPARSE_CORE in kinds or RecordKind.FACTORED_CORE in kinds:
                for v in range(n_variants):
                    fit = fits[(lid, v)] = _core_fit(upd, basis, config, v,
                                                     RecordKind.SPARSE_CORE in kinds)
                    if RecordKind.SPARSE_CORE in kinds:
                        pool += _sparse_options(fit, lid, e0, config, cap)
                    if RecordKind.FACTORED_CORE in kinds:
                        pool += _rank_options(RecordKind.FACTORED_CORE, fit.comp_a, fit.comp_b,
                                              fit.comp_energy, lid, v, e0, config, cap)
            if RecordKind.DENSE_FACTORS in kinds:
                dense_a, dense_b, s = _dense_components(upd)
                pool += _rank_options(RecordKind.DENSE_FACTORS, dense_a, dense_b, s**2, lid, 0,
                                      e0, config, cap)
        pools[lid] = pool
    if avail is not None:
        cheapest = min((o.nbytes for p in pools.values() for o in p if o.kind), default=None)
        if cheapest is None or cheapest > avail:
            raise BudgetError(
                f"budget {config.budget_bytes} B cannot hold the {config.overhead_bytes} B "
                f"overhead plus one smallest record ({cheapest} B)")
    chosen = _allocate(pools, avail)

    records, recon, errors, layer_bytes = [], {}, {}, {}
    for lid in sorted(chosen):
        opt, upd, basis = chosen[lid], f64[lid], bases[lid]
        if opt.kind is None:
            recon[lid] = (np.zeros((basis.out_features, 0), np.float32),
                          np.zeros((basis.in_features, 0), np.float32))
            errors[lid] = 1.0 if e0s[lid] > 0 else 0.0
            continue
        best = None
        for cand in _build_records(opt, upd, fits.get((lid, opt.variant)), config,
                                   (basis.out_features, basis.in_features)):
            factors = decode_factors(cand, basis, header)
            err = _rel_error(upd, *factors, e0s[lid])
            if best is None or err < best[0]:
                best = (err, cand, factors)
        assert best is not None
        errors[lid], rec, recon[lid] = best
        layer_bytes[lid] = record_nbytes(rec)
        if layer_bytes[lid] != opt.nbytes:
            raise AssertionError("record size differs from the size it was budgeted at")
        records.append(rec)
    payload = sum(layer_bytes.values())
    return EncodeResult(header, records, recon, errors, layer_bytes, payload,
                        payload + config.overhead_bytes)
