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
:func:`decode_factors` on the quantised record: what a device decodes from the same
record (on another platform or BLAS kernel: within ``decode.factor_bound``, not bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from solar_edge.decode import decode_factors
from solar_edge.encode.greedy import allocate_greedy
from solar_edge.encode.quant import quantize
from solar_edge.encode.solar_fits import (
    CoreFit,
    Option,
    core_fit,
    dense_components,
    energy,
    rank_options,
    sparse_options,
    sparse_positions,
)
from solar_edge.errors import BudgetError, CodecError
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import (
    DEFAULT_PACKET_OVERHEAD,
    MAX_LAYER_ID,
    record_nbytes,
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


def _allocate(pools: dict[int, list[Option]], avail: int | None) -> dict[int, Option]:
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


def _refit_sparse(fit: CoreFit, ij: np.ndarray, upd: LayerUpdate) -> np.ndarray:
    """Jointly least-squares coefficients for a fixed support (non-orthogonal bases)."""
    ui, vj = fit.u_t[:, ij[0]], fit.v_t[:, ij[1]]
    gram = (ui.T @ ui) * (vj.T @ vj)
    rhs = np.einsum("kr,rk->k", ui.T @ upd.B, upd.A @ vj)
    try:
        return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def _build_records(opt: Option, upd: LayerUpdate, fit: CoreFit | None, cfg: CodecConfig,
                   out_in: tuple[int, int]) -> list[LayerRecord]:
    """Candidate records of the same size for one chosen option (the caller keeps the best)."""
    eps = float(np.float32(cfg.epsilon))

    def q(v: np.ndarray) -> QuantizedValues:
        return quantize(v, opt.fmt, cfg.group_size)

    if opt.kind == RecordKind.SPARSE_CORE:
        assert fit is not None
        pos, rows, cols, ij = sparse_positions(fit, opt.size)
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
        dense_a, dense_b, _ = dense_components(upd)
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
    err = e0 - 2 * cross + energy(lf, rt.T)
    return float(np.sqrt(max(err, 0.0) / e0))


def _left_out(basis: LayerBasis) -> tuple[np.ndarray, np.ndarray]:
    """The reconstruction of a layer without a record: rank-0 factors."""
    return (np.zeros((basis.out_features, 0), np.float32),
            np.zeros((basis.in_features, 0), np.float32))


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
    pools: dict[int, list[Option]] = {}
    fits: dict[tuple[int, int], CoreFit] = {}
    e0s: dict[int, float] = {}
    for lid, upd in sorted(f64.items()):
        basis = bases[lid]
        e0 = e0s[lid] = energy(upd.B, upd.A)
        pool = [Option(lid, None, 0, 0, 0, e0)]
        if e0 > 0:
            if RecordKind.SPARSE_CORE in kinds or RecordKind.FACTORED_CORE in kinds:
                for v in range(n_variants):
                    fit = fits[(lid, v)] = core_fit(upd, basis, config, v,
                                                     RecordKind.SPARSE_CORE in kinds)
                    if RecordKind.SPARSE_CORE in kinds:
                        pool += sparse_options(fit, lid, e0, config, cap)
                    if RecordKind.FACTORED_CORE in kinds:
                        pool += rank_options(RecordKind.FACTORED_CORE, fit.comp_a, fit.comp_b,
                                              fit.comp_energy, lid, v, e0, config, cap)
            if RecordKind.DENSE_FACTORS in kinds:
                dense_a, dense_b, s = dense_components(upd)
                pool += rank_options(RecordKind.DENSE_FACTORS, dense_a, dense_b, s**2, lid, 0,
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
            recon[lid], errors[lid] = _left_out(basis), 1.0 if e0s[lid] > 0 else 0.0
            continue
        best = None
        for cand in _build_records(opt, upd, fits.get((lid, opt.variant)), config,
                                   (basis.out_features, basis.in_features)):
            lf, rt = factors = decode_factors(cand, basis, header)
            err = _rel_error(upd, lf, rt, e0s[lid])
            if best is None or err < best[0]:
                best = (err, cand, factors)
        assert best is not None
        if best[0] >= 1.0:  # quantised, it does worse than no update: leave the layer out
            recon[lid], errors[lid] = _left_out(basis), 1.0
            continue
        errors[lid], rec, recon[lid] = best
        layer_bytes[lid] = record_nbytes(rec)
        if layer_bytes[lid] != opt.nbytes:
            raise AssertionError("record size differs from the size it was budgeted at")
        records.append(rec)
    payload = sum(layer_bytes.values())
    return EncodeResult(header, records, recon, errors, layer_bytes, payload,
                        payload + config.overhead_bytes)
