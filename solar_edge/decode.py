"""Device-side decoding: a packet's records -> low-rank factors ``(L, Rt)``, ``dW = L @ Rt.T``.

Each record kind has one decoder (:class:`KindDecoder`): the codec's own kinds are below;
an adapter method that brings a kind of its own registers its decoder with the method
(:mod:`solar_edge.methods`). :func:`decode_records` is what a device runs on a verified
packet: every record's dimensions are checked against the bundle layer first (nothing is
allocated or regenerated before that), then per-packet shared state is built once (VeRA's
projections), then each record is decoded. Work is proportional to what a record keeps:
only the basis columns it uses are read and perturbed.

Cross-platform contract (docs/packet-format.md, tested by tests/board/ against golden files
written on x86-64): the PRNG words, perturbation entries and the element-wise float32
arithmetic are bit-identical on every platform; the small matrix products that turn basis
coordinates into factors (FACTORED_CORE, SPARSE_CORE) are float32 BLAS products whose
summation order is the kernel's, so another platform's factors agree within
:func:`factor_bound`, not bit for bit. A fixed order (element-wise multiply-adds) would make
them bit-identical but costs 6-60x the BLAS product (measured, docs/board-check.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from solar_edge import methods
from solar_edge.errors import CodecError
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.kinds import rule_of, value_count
from solar_edge.format.records import CodecHeader, LayerRecord, RecordKind
from solar_edge.methods.base import Factors, KindDecoder
from solar_edge.regen.bases import perturbed_columns, perturbed_leading, u_stream, v_stream


@dataclass(frozen=True)
class LayerDims:
    """What the device knows of a bundle layer before reading any array: shape and basis rank."""

    out_features: int
    in_features: int
    rank: int


def _basis_columns(record: LayerRecord, basis: LayerBasis, header: CodecHeader):
    def cols_of(side: str, idx: np.ndarray) -> np.ndarray:
        mat, stream = (basis.U, u_stream) if side == "U" else (basis.V, v_stream)
        return perturbed_columns(mat, record.layer_id, stream(record.variant), idx,
                                 header.seed, record.epsilon, header.perturbation)
    return cols_of


def _leading_columns(record: LayerRecord, basis: LayerBasis, header: CodecHeader, side: str,
                     count: int) -> np.ndarray:
    """The first ``count`` perturbed basis columns of one side (a view when eps == 0)."""
    mat, stream = (basis.U, u_stream) if side == "U" else (basis.V, v_stream)
    return perturbed_leading(mat, record.layer_id, stream(record.variant), count, header.seed,
                             record.epsilon, header.perturbation)


def _check_basis(record: LayerRecord, basis: LayerBasis | None) -> LayerBasis:
    if basis is None:
        raise CodecError(f"layer {record.layer_id}: a basis is needed for {record.kind.name}")
    if basis.layer_id != record.layer_id:
        raise CodecError(f"record for layer {record.layer_id} given basis of {basis.layer_id}")
    if record.rows > basis.U.shape[1] or record.cols > basis.V.shape[1]:
        raise CodecError(f"layer {record.layer_id}: core {record.rows}x{record.cols} exceeds "
                         f"basis ranks {basis.U.shape[1]}x{basis.V.shape[1]}")
    return basis


def _split_factors(record: LayerRecord, values: np.ndarray) -> Factors:
    split = record.rows * record.rank
    return (values[:split].reshape(record.rows, record.rank),
            values[split:].reshape(record.cols, record.rank))


def _dense(record: LayerRecord, values: np.ndarray, basis: LayerBasis | None,
           header: CodecHeader, shared: Any) -> Factors:
    if basis is not None and (record.rows, record.cols) != (basis.out_features,
                                                           basis.in_features):
        raise CodecError(f"layer {record.layer_id}: dense factors {record.rows}x{record.cols}"
                         f" do not match weight {basis.out_features}x{basis.in_features}")
    return _split_factors(record, values)


def _factored(record: LayerRecord, values: np.ndarray, basis: LayerBasis | None,
              header: CodecHeader, shared: Any) -> Factors:
    basis = _check_basis(record, basis)
    a, b = _split_factors(record, values)
    return (_leading_columns(record, basis, header, "U", record.rows) @ a,
            _leading_columns(record, basis, header, "V", record.cols) @ b)


def _sparse(record: LayerRecord, values: np.ndarray, basis: LayerBasis | None,
            header: CodecHeader, shared: Any) -> Factors:
    cols_of = _basis_columns(record, _check_basis(record, basis), header)
    pos = np.asarray(record.positions, dtype=np.int64).reshape(-1)
    if pos.size == 0:
        return (np.zeros((cols_of("U", pos[:0]).shape[0], 0), np.float32),
                np.zeros((cols_of("V", pos[:0]).shape[0], 0), np.float32))
    if pos[0] < 0 or pos[-1] >= record.rows * record.cols or np.any(np.diff(pos) <= 0):
        raise CodecError(f"layer {record.layer_id}: positions must be strictly increasing "
                         f"and < {record.rows * record.cols}")
    i, j = np.divmod(pos, record.cols)
    ui, inv_i = np.unique(i, return_inverse=True)
    uj, inv_j = np.unique(j, return_inverse=True)
    u_cols, v_cols = cols_of("U", ui), cols_of("V", uj)
    # dW = sum_k v_k u_{i_k} v_{j_k}^T: keep the side with fewer distinct columns as a factor
    if ui.size <= uj.size:
        return u_cols, _grouped_sum(v_cols, inv_j, inv_i, ui.size, values)
    return _grouped_sum(u_cols, inv_i, inv_j, uj.size, values), v_cols


# A BLAS product does a multiply-add 100-200x faster than gather + reduceat does one
# (measured on x86-64, docs/runtime.md): the dense core is used up to this many cells per value.
DENSE_CELLS_PER_VALUE = 128


def _grouped_sum(cols: np.ndarray, member: np.ndarray, group: np.ndarray, n_groups: int,
                 values: np.ndarray) -> np.ndarray:
    """Column g of the result = sum over k with group[k] == g of values[k] * cols[:, member[k]].

    Cost ``O(rows * k)`` either way: a dense ``n_groups x cols`` core in one BLAS product
    (``rows * cells`` multiply-adds) while it has at most :data:`DENSE_CELLS_PER_VALUE` cells
    per value, else the ``k`` gathered rows of ``cols.T`` summed per group by reduceat (the
    same bits as summing the columns of ``cols``)."""
    k = values.size
    if n_groups * cols.shape[1] <= DENSE_CELLS_PER_VALUE * k:
        s = np.zeros((n_groups, cols.shape[1]), np.float32)
        s[group, member] = values
        return cols @ s.T
    order = np.argsort(group, kind="stable")
    contrib = np.ascontiguousarray(cols.T)[member[order]]
    contrib *= values[order, None]
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    return np.ascontiguousarray(np.add.reduceat(contrib, starts, axis=0).T, np.float32)


def _vector(record: LayerRecord, values: np.ndarray, basis: LayerBasis | None,
            header: CodecHeader, shared: Any) -> np.ndarray:
    return values.astype(np.float32).reshape(record.rows)


def _tensor(record: LayerRecord, values: np.ndarray, basis: LayerBasis | None,
            header: CodecHeader, shared: Any) -> np.ndarray:
    return values.astype(np.float32).reshape(record.rows, record.cols)


DECODERS: dict[RecordKind, KindDecoder] = {
    RecordKind.SPARSE_CORE: KindDecoder(_sparse, needs_basis=True),
    RecordKind.FACTORED_CORE: KindDecoder(_factored, needs_basis=True),
    RecordKind.DENSE_FACTORS: KindDecoder(_dense, needs_basis=False),
    RecordKind.HEAD_TENSOR: KindDecoder(_tensor, needs_basis=False, part="head"),
    RecordKind.BIAS_DELTA: KindDecoder(_vector, needs_basis=False, part="bias"),
    RecordKind.MAGNITUDE_DELTA: KindDecoder(_vector, needs_basis=False, part="magnitude"),
    **methods.record_decoders(),
}


@dataclass
class Decoded:
    """A packet's records decoded: factors, bias and magnitude deltas by layer id, and the
    head's tensors by their index in the metadata's head spec."""

    factors: dict[int, Factors] = field(default_factory=dict)
    biases: dict[int, np.ndarray] = field(default_factory=dict)
    magnitudes: dict[int, np.ndarray] = field(default_factory=dict)
    head: dict[int, np.ndarray] = field(default_factory=dict)

    def part(self, name: str) -> dict[int, Any]:
        parts: dict[str, dict[int, Any]] = {"factors": self.factors, "bias": self.biases,
                                            "magnitude": self.magnitudes, "head": self.head}
        return parts[name]


def decoder_of(kind: RecordKind) -> KindDecoder:
    try:
        return DECODERS[RecordKind(kind)]
    except (KeyError, ValueError):
        raise CodecError(f"no decoder for record kind {kind!r}") from None


def shared_state(records: Sequence[LayerRecord]) -> dict[RecordKind, Any]:
    """Per-packet state of each kind that needs one (built once, e.g. VeRA projections)."""
    state = {}
    for kind in sorted({r.kind for r in records}):
        decoder = decoder_of(kind)
        if decoder.prepare is not None:
            state[kind] = decoder.prepare([r for r in records if r.kind == kind])
    return state


def decode_factors(record: LayerRecord, basis: LayerBasis | None, header: CodecHeader,
                   shared: Any = None) -> Any:
    """One record decoded: ``(L, Rt)`` float32 for factor kinds, else its vector or tensor
    (:attr:`KindDecoder.part`). ``shared``: its kind's per-packet state
    (:func:`shared_state`), needed by kinds with shared projections only."""
    values = record.values.dequantize()
    expected = value_count(record.kind, record.rows, record.cols, record.rank,
                           int(record.positions.size))
    if values.size != expected:
        raise CodecError(f"layer {record.layer_id}: {values.size} values, expected {expected}")
    if not 0 <= record.variant < 2**31:
        raise CodecError(f"layer {record.layer_id}: variant {record.variant} out of range")
    return decoder_of(record.kind).decode(record, values, basis, header, shared)


def check_dims(record: LayerRecord, dims: LayerDims) -> None:
    """A record's dimensions against its bundle layer, before anything is allocated."""
    rule = rule_of(record.kind)
    if rule.dims == "head":
        return  # checked against the metadata's head spec by the reader
    if rule.dims == "rows":
        ok = record.rows == dims.out_features and record.cols == 1
        want = f"a vector of the weight's {dims.out_features} outputs"
    elif rule.dims == "weight":
        ok = (record.rows, record.cols) == (dims.out_features, dims.in_features)
        want = f"the weight's {dims.out_features}x{dims.in_features}"
    else:
        ok = record.rows <= dims.rank and record.cols <= dims.rank
        want = f"within the basis rank {dims.rank}"
    if not ok:
        raise CodecError(f"layer {record.layer_id}: {record.kind.name} record "
                         f"{record.rows}x{record.cols} is not {want}")


def decode_records(records: Sequence[LayerRecord], header: CodecHeader,
                   dims_of: Callable[[int], LayerDims | None],
                   basis_of: Callable[[int], LayerBasis]) -> Decoded:
    """Every record of a packet: dimension checks, shared state, then per-record decodes.

    ``dims_of(layer_id)`` is None for a layer the bundle does not have (a CodecError)."""
    for rec in records:
        if rule_of(rec.kind).dims == "head":
            continue  # head tensors have their own ids
        dims = dims_of(rec.layer_id)
        if dims is None:
            raise CodecError(f"packet names layer {rec.layer_id}, which the bundle does not have")
        check_dims(rec, dims)
    shared = shared_state(records)
    out = Decoded()
    for rec in records:
        decoder = decoder_of(rec.kind)
        basis = basis_of(rec.layer_id) if decoder.needs_basis else None
        out.part(decoder.part)[rec.layer_id] = decode_factors(rec, basis, header,
                                                              shared.get(rec.kind))
    return out


def factors_by_layer(records: Sequence[LayerRecord], header: CodecHeader,
                     bases: Mapping[int, LayerBasis]) -> dict[int, Factors]:
    """:func:`decode_factors` of each factor record against ``bases`` (encoder side)."""
    shared = shared_state(records)
    return {r.layer_id: decode_factors(r, bases.get(r.layer_id), header, shared.get(r.kind))
            for r in records if decoder_of(r.kind).part == "factors"}


def _gamma(n: int) -> float:
    u = 2.0**-24  # float32 unit roundoff
    return n * u / (1 - n * u)


def factor_bound(record: LayerRecord, basis: LayerBasis, header: CodecHeader
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-element bounds (float64) on how far two conforming decodes of a FACTORED_CORE
    or SPARSE_CORE record may differ: ``2 * gamma_n * (|B| @ |C|)`` for each factor that is
    a float32 product ``B @ C`` of ``n``-term sums (any order, fused or not); 0 where a
    factor is element-wise only. The contract of docs/packet-format.md, tested against the
    golden files written on x86-64 (tests/board/)."""
    basis = _check_basis(record, basis)
    if record.kind == RecordKind.FACTORED_CORE:
        a, b = _split_factors(record, record.values.dequantize())
        out = []
        for side, coef in (("U", a), ("V", b)):
            cols = np.abs(_leading_columns(record, basis, header, side, coef.shape[0]))
            out.append(2 * _gamma(coef.shape[0]) * (cols.astype(np.float64)
                                                    @ np.abs(coef).astype(np.float64)))
        return out[0], out[1]
    if record.kind != RecordKind.SPARSE_CORE:
        raise CodecError(f"{record.kind.name} factors involve no product: no tolerance")
    values = record.values.dequantize().astype(np.float64)
    pos = np.asarray(record.positions, dtype=np.int64).reshape(-1)
    i, j = np.divmod(pos, record.cols)
    ui, inv_i = np.unique(i, return_inverse=True)
    uj, inv_j = np.unique(j, return_inverse=True)
    cols_of = _basis_columns(record, basis, header)
    if ui.size <= uj.size:  # the same choice of factor as _sparse
        cols, member, group, n_groups, exact = cols_of("V", uj), inv_j, inv_i, ui.size, "L"
    else:
        cols, member, group, n_groups, exact = cols_of("U", ui), inv_i, inv_j, uj.size, "R"
    s = np.zeros((n_groups, cols.shape[1]))
    np.add.at(s, (group, member), np.abs(values))
    bound = 2 * _gamma(cols.shape[1]) * (np.abs(cols).astype(np.float64) @ s.T)
    zero = np.zeros(cols_of("U" if exact == "L" else "V", ui if exact == "L" else uj).shape)
    return (zero, bound) if exact == "L" else (bound, zero)
