"""Apply cost: decoding touches only the basis columns a record keeps, bases are mapped once
per runtime, and the staging products run on one BLAS thread.

Unused basis columns are filled with NaN: any read of one would make the factors non-finite,
so a finite, correct result shows that decoding did not read them.
"""

from __future__ import annotations

import numpy as np
import pytest

from solar_edge.decode import DENSE_CELLS_PER_VALUE, decode_factors
from solar_edge.encode.quant import quantize
from solar_edge.encode.solar import CodecConfig, encode
from solar_edge.format import signing
from solar_edge.format.bundle import LayerBasis, load_bundle
from solar_edge.format.packet import PacketHeader
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import LayerUpdate
from solar_edge.regen.bases import perturbed_columns
from solar_edge.runtime.patching import one_blas_thread

R = DENSE_CELLS_PER_VALUE + 32  # room for a record too scattered for the dense core
OUT, IN = R + 8, R + 4


def _basis_with_nan_outside(rng, u_cols, v_cols) -> LayerBasis:
    """Orthonormal-ish random U, V whose columns outside ``u_cols`` / ``v_cols`` are NaN."""
    u = rng.normal(size=(OUT, R)).astype(np.float32)
    v = rng.normal(size=(IN, R)).astype(np.float32)
    u[:, np.setdiff1d(np.arange(R), u_cols)] = np.nan
    v[:, np.setdiff1d(np.arange(R), v_cols)] = np.nan
    return LayerBasis(3, u, v)


def _f32(values):
    return quantize(np.asarray(values, np.float32), ValueFormat.FLOAT32)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_factored_core_reads_only_its_leading_columns(eps):
    rng = np.random.default_rng(0)
    rows, cols, k = 5, 7, 3
    basis = _basis_with_nan_outside(rng, np.arange(rows), np.arange(cols))
    a = rng.normal(size=(rows, k)).astype(np.float32)
    b = rng.normal(size=(cols, k)).astype(np.float32)
    rec = LayerRecord(3, RecordKind.FACTORED_CORE, rows, cols, k,
                      _f32(np.concatenate([a.ravel(), b.ravel()])), epsilon=eps)
    header = CodecHeader(seed=5, perturbation=PerturbationKind.RADEMACHER)
    left, right_t = decode_factors(rec, basis, header)
    assert np.isfinite(left).all() and np.isfinite(right_t).all()
    ut = perturbed_columns(basis.U, 3, 0, np.arange(rows), 5, eps, header.perturbation)
    vt = perturbed_columns(basis.V, 3, 1, np.arange(cols), 5, eps, header.perturbation)
    expected = ut.astype(np.float64) @ a @ b.T @ vt.astype(np.float64).T
    np.testing.assert_allclose(left @ right_t.T, expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def _sparse_record(rng, ij: list[tuple[int, int]], cols: int = R) -> tuple[LayerRecord, np.ndarray]:
    flat = sorted(i * cols + j for i, j in ij)
    vals = rng.normal(size=len(flat)).astype(np.float32)
    rec = LayerRecord(3, RecordKind.SPARSE_CORE, R, cols, 0, _f32(vals),
                      positions=np.asarray(flat, np.uint32))
    return rec, vals


@pytest.mark.parametrize("regime", ["dense", "gathered"])
def test_sparse_core_reads_only_its_columns_in_both_regimes(regime):
    """Few distinct rows/columns per value: one BLAS product over a dense core; scattered
    values: gathered columns summed per group. Both read only the columns the record names."""
    rng = np.random.default_rng(1)
    if regime == "dense":  # 3 x 3 cells for 6 values
        ij = [(1, 2), (1, 9), (4, 2), (4, 90), (20, 9), (20, 90)]
    else:  # every value its own row and column: K x K cells for K values > threshold
        ij = [(i, (i + 3) % R) for i in range(DENSE_CELLS_PER_VALUE + 16)]
    cells = len({i for i, _ in ij}) * len({j for _, j in ij})
    assert (cells <= DENSE_CELLS_PER_VALUE * len(ij)) == (regime == "dense")
    rec, _ = _sparse_record(rng, ij)
    basis = _basis_with_nan_outside(rng, sorted({i for i, _ in ij}), sorted({j for _, j in ij}))
    left, right_t = decode_factors(rec, basis, CodecHeader(seed=0))
    assert np.isfinite(left).all() and np.isfinite(right_t).all()
    vals = rec.values.dequantize().astype(np.float64)
    order = np.argsort(rec.positions)
    expected = np.zeros((OUT, IN))
    for (i, j), v in zip(sorted(ij), vals[order], strict=True):
        expected += v * np.outer(basis.U[:, i], basis.V[:, j])
    # float32 products: within float32 rounding of the summation order
    np.testing.assert_allclose(left @ right_t.T, expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_gathered_sparse_sums_keep_the_bits_of_the_column_layout():
    """The gathered regime sums contiguous rows of ``V.T``; it must give the bits the
    earlier column layout gave (``np.add.reduceat`` over ``value * V[:, j]`` columns, in
    packet order per group), so packets decode to the same factors as before."""
    rng = np.random.default_rng(2)
    ij = [(i, (i + 3) % R) for i in range(DENSE_CELLS_PER_VALUE + 16)]
    ij += [(2, 50), (4, 51), (4, 52), (4, 1)]
    ij = sorted(set(ij))
    n_rows, n_cols = len({i for i, _ in ij}), len({j for _, j in ij})
    assert n_rows <= n_cols and n_rows * n_cols > DENSE_CELLS_PER_VALUE * len(ij)
    rec, vals = _sparse_record(rng, ij)
    basis = LayerBasis(3, rng.normal(size=(OUT, R)).astype(np.float32),
                       rng.normal(size=(IN, R)).astype(np.float32))
    left, right_t = decode_factors(rec, basis, CodecHeader(seed=0))
    rows = sorted({i for i, _ in ij})
    assert left.shape[1] == right_t.shape[1] == len(rows)  # distinct rows (<= columns)
    assert np.array_equal(left, basis.U[:, rows])
    i_of = np.array([i for i, _ in ij])
    contrib = np.stack([v * basis.V[:, j] for (_, j), v in zip(ij, vals, strict=True)], axis=1)
    starts = np.flatnonzero(np.r_[True, np.diff(i_of) != 0])
    assert np.array_equal(right_t, np.add.reduceat(contrib, starts, axis=1))
    assert right_t.flags["C_CONTIGUOUS"] and right_t.dtype == np.float32


def test_the_runtime_maps_each_layers_basis_once(tiny_bundle, monkeypatch):
    """Two applies of packets on the same layers open each layer's basis files once."""
    from solar_edge.runtime.bundle_parts import BundleParts
    from solar_edge.runtime.engine import EdgeRuntime

    opened: list[int] = []
    real = BundleParts.basis

    def spy(self, layer_id):  # spy around the real method (counts, then delegates)
        opened.append(layer_id)
        return real(self, layer_id)

    monkeypatch.setattr(BundleParts, "basis", spy)
    key = signing.generate_private_key()
    lids = [0, 1, 2]
    rt = EdgeRuntime(str(tiny_bundle), [key.public_key()])
    for version in (1, 2):
        rt.apply(_factored_packet(tiny_bundle, key, version, lids=lids, seed=3))
    assert sorted(opened) == lids
    assert rt.active is not None and rt.active.version == 2


def test_one_blas_thread_limits_blas_inside_and_restores_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    before = blas_threads()
    assert before, "numpy's BLAS is not visible to threadpoolctl"
    with one_blas_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def _factored_packet(tiny_bundle, key, version: int = 1, compress: bool | None = None,
                     lids: tuple[int, ...] | list[int] = (0, 1), seed: int = 4) -> bytes:
    """Rank-2 factored cores of random updates on ``lids``, signed with ``key``."""
    bundle = load_bundle(tiny_bundle)
    rng = np.random.default_rng(seed)
    ups = {lid: LayerUpdate(bundle.layers[lid].name,
                            rng.normal(size=(bundle.layers[lid].shape[0], 2)).astype(np.float32),
                            rng.normal(size=(2, bundle.layers[lid].shape[1])).astype(np.float32))
           for lid in lids}
    res = encode(ups, {lid: bundle.layer_basis(lid) for lid in lids},
                 CodecConfig(representation="factored_core", max_rank=2))
    return encode_packet(PacketHeader(bundle.fingerprint, "a", version, {}), res.header,
                         res.records, key, compress=compress)


@pytest.mark.parametrize("compress", [True, False])
def test_the_reader_checks_the_layer_table_once(tiny_bundle, monkeypatch, compress):
    """A zstd body's table is checked while it decompresses; the payload reader reuses that
    result instead of checking the same bytes again (it did, once more per packet)."""
    from solar_edge.format import reader

    calls: list[int] = []
    real = reader._read_table

    def spy(table, limits, metadata):  # spy around the real check (counts, then delegates)
        calls.append(len(table))
        return real(table, limits, metadata)

    monkeypatch.setattr(reader, "_read_table", spy)
    key = signing.generate_private_key()
    data = _factored_packet(tiny_bundle, key, compress=compress)
    packet = reader.decode_packet(data, [key.public_key()])
    assert packet.compressed is compress
    assert calls == [2 * reader.LAYER_ENTRY_BYTES]
    assert [r.layer_id for r in packet.records] == [0, 1]


@pytest.mark.parametrize("where", ["left", "right"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_factors_rejects_any_non_finite_entry(where, bad):
    """check_factors reads each factor's max and min only; a NaN or an infinity anywhere, in
    either factor, is still a HealthCheckError."""
    from solar_edge.errors import HealthCheckError
    from solar_edge.runtime.patching import check_factors

    rng = np.random.default_rng(6)
    left = rng.normal(size=(6, 3)).astype(np.float32)
    right_t = rng.normal(size=(5, 3)).astype(np.float32)
    (left if where == "left" else right_t)[4, 1] = bad
    with pytest.raises(HealthCheckError, match="non-finite"):
        check_factors(7, (6, 5), (left, right_t))


def test_check_factors_overflow_bound_uses_the_largest_magnitude():
    """A factor whose largest magnitude is negative still counts in the overflow bound: a
    finite pair whose product overflows float32 is rejected, a large but safe one passes."""
    from solar_edge.errors import HealthCheckError
    from solar_edge.runtime.patching import check_factors

    left = np.ones((4, 1), np.float32)
    right_t = np.ones((3, 1), np.float32)
    left[2, 0], right_t[1, 0] = -3e19, -3e19  # product 9e38 > float32 max 3.4e38
    with pytest.raises(HealthCheckError, match="overflows"):
        check_factors(1, (4, 3), (left, right_t))
    right_t[1, 0] = -1e19  # bound 3e38 >= F32_MAX / 2, but the product 3e38 is finite
    out = check_factors(1, (4, 3), (left, right_t))
    assert np.isfinite(out[0] @ out[1].T).all()


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("count,group", [(0, 4), (1, 4), (64, 64), (70, 16), (6144, 64)])
def test_integer_values_dequantize_to_code_times_scale(bits, count, group):
    """Packed codes read back exactly, and each value is float32(code) * float32(scale of its
    group), the tail group included, bit for bit."""
    from solar_edge.format import bitpack
    from solar_edge.format.records import QuantizedValues

    rng = np.random.default_rng(bits * 1000 + count)
    top = (1 << (bits - 1)) - 1
    codes = rng.integers(-top, top + 1, size=count).astype(np.int8)
    read = bitpack.unpack_codes(bitpack.pack_codes(codes, bits), bits, count)
    assert read.dtype == np.int8 and np.array_equal(read, codes)
    scales = rng.uniform(0.01, 2.0, size=-(-count // group)).astype(np.float16)
    got = QuantizedValues(ValueFormat(bits), count, group, codes=read, scales=scales).dequantize()
    want = np.array([np.float32(c) * np.float32(scales[i // group])
                     for i, c in enumerate(codes)], np.float32).reshape(count)
    assert got.dtype == np.float32 and got.shape == (count,)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_generic_bundle_refuses_text_and_wrong_arrays_with_typed_errors(tiny_bundle):
    from solar_edge.errors import RuntimeApplyError
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(tiny_bundle), [signing.generate_private_key().public_key()])
    with pytest.raises(RuntimeApplyError, match=r"not text.*EdgeRuntime\.infer"):
        rt.infer(["hello"])
    name = rt.backend.session.get_inputs()[0].name
    with pytest.raises(RuntimeApplyError, match="the graph refused these inputs"):
        rt.infer({name: np.zeros((2, 3, 4, 5), np.float32)})
