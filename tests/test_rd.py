"""Activation-aware fits and global byte allocation (solar_edge.encode.actaware, .allocate).

Pure numeric tests on seeded low-rank updates with anisotropic input Grams; every size is
checked against the real packet writer and every error against a dense recomputation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from solar_edge.decode import decode_factors
from solar_edge.encode.actaware import (
    LayerFit,
    Whitener,
    quantized_fit,
    weighted_sq_error,
    whitened_factors,
)
from solar_edge.encode.allocate import (
    AllocConfig,
    allocate,
    allocation_for_budget,
    allocation_for_error,
    layer_options,
    mean_relative_error,
    uniform_baselines,
)
from solar_edge.encode.quant import mse_quantize, quantize
from solar_edge.errors import BudgetError, CodecError
from solar_edge.format import signing
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import fixed_overhead_bytes
from solar_edge.format.packet import PacketHeader
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import CodecHeader, RecordKind, ValueFormat
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import LayerUpdate

SHAPES = [(48, 32), (32, 48), (40, 40), (64, 32)]
KEY = signing.generate_private_key()
HEADER = PacketHeader(bytes(32), "rd-test", 1, {"task": "t"})
OVERHEAD = fixed_overhead_bytes("rd-test", {"task": "t"})


def _gram(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((4 * n, n)) * np.geomspace(3.0, 0.05, n)  # anisotropic inputs
    return x.T @ x / x.shape[0]


def _layers(seed: int = 0):
    rng = np.random.default_rng(seed)
    updates, bases, grams = {}, {}, {}
    for lid, (n_out, n_in) in enumerate(SHAPES):
        scale = 10.0 ** rng.uniform(-2, 0)
        updates[lid] = LayerUpdate(f"l{lid}", rng.standard_normal((n_out, 6)) * scale,
                                   rng.standard_normal((6, n_in)))
        u = np.linalg.qr(rng.standard_normal((n_out, min(n_out, n_in))))[0]
        v = np.linalg.qr(rng.standard_normal((n_in, min(n_out, n_in))))[0]
        bases[lid] = LayerBasis(lid, u.astype(np.float32), v.astype(np.float32))
        grams[lid] = _gram(rng, n_in)
    return updates, bases, grams


@pytest.mark.parametrize("fmt", [ValueFormat.INT2, ValueFormat.INT3, ValueFormat.INT4])
def test_mse_scales_beat_absmax_scales_on_gaussian_values(fmt: ValueFormat) -> None:
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    mse = mse_quantize(x, fmt, 64)
    absmax = quantize(x, fmt, 64)
    assert np.abs(mse.codes).max() <= (1 << (fmt.bits - 1)) - 1
    assert ((mse.dequantize() - x) ** 2).sum() < ((absmax.dequantize() - x) ** 2).sum()


def test_weighted_error_matches_dense() -> None:
    rng = np.random.default_rng(1)
    B, A = rng.standard_normal((20, 3)), rng.standard_normal((3, 15))
    L, Rt = rng.standard_normal((20, 2)), rng.standard_normal((15, 2))
    g = _gram(rng, 15)
    e = B @ A - L @ Rt.T
    assert weighted_sq_error(B, A, L, Rt, g) == pytest.approx(np.trace(e @ g @ e.T), rel=1e-9)
    assert weighted_sq_error(B, A, L, Rt, np.eye(15)) == pytest.approx((e**2).sum(), rel=1e-9)


def test_whitened_truncation_beats_plain_svd_in_the_activation_norm() -> None:
    rng = np.random.default_rng(2)
    B, A = rng.standard_normal((30, 6)), rng.standard_normal((6, 25))
    g = _gram(rng, 25)
    w = Whitener.from_gram(g, 25, ridge=0.0)
    u, s, vt = np.linalg.svd(B @ A)
    for k in (1, 2, 4):
        L, Rt = whitened_factors(B, A, w, k)
        plain = weighted_sq_error(B, A, u[:, :k] * s[:k], vt[:k].T, g)
        assert weighted_sq_error(B, A, L, Rt, g) < plain
    L, Rt = whitened_factors(B, A, w, 6)  # full rank: exact
    assert weighted_sq_error(B, A, L, Rt, g) < 1e-8 * weighted_sq_error(
        B, A, np.zeros((30, 0)), np.zeros((25, 0)), g)


@pytest.mark.parametrize("kind", [RecordKind.DENSE_FACTORS, RecordKind.FACTORED_CORE])
@pytest.mark.parametrize("fmt", [ValueFormat.INT2, ValueFormat.INT4, ValueFormat.INT8])
def test_fit_is_measured_on_what_the_packet_carries(kind: RecordKind, fmt: ValueFormat) -> None:
    updates, bases, grams = _layers(3)
    upd, basis = updates[2], bases[2]
    w = Whitener.from_gram(grams[2], 40)
    fit = quantized_fit(upd, 2, w, 2, fmt, 64, kind, basis)
    data = encode_packet(HEADER, CodecHeader(seed=0), [fit.record], KEY, compress=False)
    assert len(data) == OVERHEAD + fit.nbytes
    rec = decode_packet(data, [KEY.public_key()]).records[0]
    L, Rt = decode_factors(rec, basis, CodecHeader(seed=0))
    e = upd.B @ upd.A - L.astype(np.float64) @ Rt.T.astype(np.float64)
    assert np.trace(e @ w.gram @ e.T) == pytest.approx(fit.err, rel=1e-6, abs=1e-9)


def test_more_bits_and_rank_lower_the_error() -> None:
    updates, bases, grams = _layers(4)
    opts = layer_options(updates, bases, grams, AllocConfig(max_rank=3))
    for fits in opts.values():
        by = {(f.rank, f.bits): f.err for f in fits[1:]}
        assert fits[0].kind is None and fits[0].nbytes == 0
        assert by[(1, 8)] < min(by[(1, 2)], by[(1, 4)]) and by[(1, 4)] < fits[0].err
        assert by[(3, 8)] < by[(1, 8)]


@pytest.mark.parametrize("budget", [700, 1000, 1500, 2500, 4000, 8000])
def test_budget_is_respected_by_the_signed_packet(budget: int) -> None:
    updates, bases, grams = _layers(5)
    opts = layer_options(updates, bases, grams, AllocConfig(max_rank=6, overhead_bytes=OVERHEAD))
    alloc = allocation_for_budget(opts, budget, OVERHEAD)
    assert alloc.total_bytes <= budget
    data = encode_packet(HEADER, CodecHeader(seed=0), alloc.records, KEY)
    assert len(data) <= alloc.total_bytes
    raw = encode_packet(HEADER, CodecHeader(seed=0), alloc.records, KEY, compress=False)
    assert len(raw) == alloc.total_bytes
    left = budget - alloc.total_bytes  # the allocator spends the budget: no upgrade still fits
    for lid, fits in opts.items():
        cur = alloc.chosen[lid]
        assert not any(f.err < cur.err and f.nbytes - cur.nbytes <= left for f in fits)


def test_bigger_budget_never_worse_on_these_layers() -> None:
    updates, bases, grams = _layers(6)
    opts = layer_options(updates, bases, grams, AllocConfig(max_rank=6, overhead_bytes=OVERHEAD))
    errs = [allocation_for_budget(opts, b, OVERHEAD).total_error for b in (800, 2000, 6000)]
    assert errs[0] > errs[1] > errs[2]


def test_activation_metric_drops_layers_that_do_not_move_outputs() -> None:
    updates, bases, grams = _layers(7)
    cfg = AllocConfig(overhead_bytes=OVERHEAD)
    before = allocation_for_budget(layer_options(updates, bases, grams, cfg), 900, OVERHEAD)
    grams[0] = grams[0] * 1e-6  # layer 0's inputs are nearly silent
    after = allocation_for_budget(layer_options(updates, bases, grams, cfg), 900, OVERHEAD)
    assert before.chosen[0].kind is not None
    assert after.chosen[0].kind is None
    assert sum(f.nbytes for lid, f in after.chosen.items() if lid) > sum(
        f.nbytes for lid, f in before.chosen.items() if lid)


@pytest.mark.parametrize("bound", [0.5, 0.2, 0.05])
def test_max_error_meets_its_bound(bound: float) -> None:
    updates, bases, grams = _layers(8)
    opts = layer_options(updates, bases, grams, AllocConfig(max_rank=6, overhead_bytes=OVERHEAD))
    alloc = allocation_for_error(opts, bound, OVERHEAD)
    assert alloc.total_error <= bound
    # measured independently from the decoded packet
    data = encode_packet(HEADER, CodecHeader(seed=0), alloc.records, KEY)
    recs = {r.layer_id: r for r in decode_packet(data, [KEY.public_key()]).records}
    num = den = 0.0
    for lid, u in updates.items():
        dw = u.B @ u.A
        approx = np.zeros_like(dw)
        if lid in recs:
            L, Rt = decode_factors(recs[lid], bases[lid], CodecHeader(seed=0))
            approx = L.astype(np.float64) @ Rt.T.astype(np.float64)
        e = dw - approx
        num += np.trace(e @ grams[lid] @ e.T)
        den += np.trace(dw @ grams[lid] @ dw.T)
    assert np.sqrt(num / den) <= bound * (1 + 1e-6)


def test_tighter_bound_costs_more_bytes() -> None:
    updates, bases, grams = _layers(9)
    opts = layer_options(updates, bases, grams, AllocConfig(max_rank=6, overhead_bytes=OVERHEAD))
    loose = allocation_for_error(opts, 0.5, OVERHEAD)
    tight = allocation_for_error(opts, 0.05, OVERHEAD)
    assert loose.total_bytes < tight.total_bytes


def test_budget_below_overhead_plus_one_record_is_refused() -> None:
    updates, bases, grams = _layers(10)
    opts = layer_options(updates, bases, grams, AllocConfig(max_rank=6, overhead_bytes=OVERHEAD))
    with pytest.raises(BudgetError):
        allocation_for_budget(opts, OVERHEAD + 10, OVERHEAD)


# --- the data-free default: every layer counts alike, never worse than a plain baseline ----


def _relative_errors(updates, alloc) -> list[float]:
    """Each layer's relative Frobenius error, recomputed from the records the packet carries."""
    out = []
    for lid, upd in updates.items():
        dw = upd.B @ upd.A
        rec = next((r for r in alloc.records if r.layer_id == lid), None)
        approx = np.zeros_like(dw)
        if rec is not None:
            L, Rt = decode_factors(rec, None, CodecHeader(seed=0))
            approx = L.astype(np.float64) @ Rt.astype(np.float64).T
        out.append(float(np.linalg.norm(dw - approx) ** 2 / np.linalg.norm(dw) ** 2))
    return out


def test_the_data_free_allocation_balances_layers_of_very_different_size() -> None:
    updates, bases, _ = _layers(5)
    cfg = AllocConfig(max_rank=4, overhead_bytes=OVERHEAD, use_basis=False)
    fits = layer_options(updates, bases, {}, cfg)
    budget = OVERHEAD + 900
    plain = allocation_for_budget(fits, budget, OVERHEAD)
    fair = allocation_for_budget(fits, budget, OVERHEAD, balance=True)
    assert fair.total_bytes <= budget and plain.total_bytes <= budget
    # the absolute objective starves the small layers; the balanced one does not
    assert np.mean(_relative_errors(updates, fair)) < np.mean(_relative_errors(updates, plain))
    assert max(_relative_errors(updates, fair)) < 1.0  # no layer left out


@pytest.mark.parametrize("extra", [200, 900, 2500, 8000])
def test_the_data_free_allocation_is_never_worse_than_a_uniform_baseline(extra: int) -> None:
    updates, bases, _ = _layers(6)
    cfg = AllocConfig(max_rank=2, overhead_bytes=OVERHEAD, use_basis=False)
    fits = layer_options(updates, bases, {}, cfg)
    avail = extra
    try:
        fair = allocation_for_budget(fits, OVERHEAD + avail, OVERHEAD, balance=True)
    except BudgetError:
        return
    ours = float(np.mean(_relative_errors(updates, fair)))
    for pick in uniform_baselines(fits, avail):
        chosen = {lid: fits[lid][i] for lid, i in pick.items()}
        records = [f.record for f in chosen.values() if f.record is not None]
        baseline = float(np.mean(_relative_errors(
            updates, type(fair)(chosen, fair.e0, OVERHEAD, records))))
        assert ours <= baseline * (1 + 1e-6)
    assert mean_relative_error(fair.chosen, fair.e0) == pytest.approx(
        float(np.mean(_relative_errors(updates, fair))), rel=1e-3)


def _points(lid: int, e0: float, *kept: tuple[int, float]) -> list[LayerFit]:
    """A layer's operating points: left out (0 B, ``e0``), then ``(bytes, err)`` records."""
    out = [LayerFit(lid, 0, 0, None, 0, e0)]
    out += [LayerFit(lid, 1, 4, RecordKind.DENSE_FACTORS, b, e) for b, e in kept]
    return out


def test_cover_leaves_no_updated_layer_out_when_the_cheapest_records_fit() -> None:
    # layer 0 buys most per byte twice over; plain greedy spends all 200 B on it
    options = {0: _points(0, 1.0, (100, 0.5), (200, 0.1)), 1: _points(1, 1.0, (100, 0.9)),
               2: _points(2, 0.0, (100, 0.0))}  # an update of zero: nothing to cover
    plain = allocate(options, 200)
    assert plain[0].nbytes == 200 and plain[1].kind is None
    covered = allocate(options, 200, cover=True)
    assert (covered[0].nbytes, covered[1].nbytes, covered[2].kind) == (100, 100, None)
    assert allocate(options, 300, cover=True)[0].nbytes == 200  # the rest still upgrades
    # the cheapest records do not fit together: the allocation is the plain one
    assert allocate(options, 150, cover=True) == allocate(options, 150)


def test_quant_weight_discounts_only_what_quantisation_adds() -> None:
    """Data-free: a rank-k point's distortion is the SVD tail beyond k (computed here from
    the dense update) plus ``quant_weight`` times the rest; the records do not change."""
    updates, bases, _ = _layers(7)
    cfg = AllocConfig(max_rank=3, overhead_bytes=OVERHEAD, use_basis=False,
                      formats=(ValueFormat.INT2, ValueFormat.INT8))
    full = layer_options(updates, bases, {}, cfg)
    half = layer_options(updates, bases, {}, replace(cfg, quant_weight=0.5))
    for lid, upd in updates.items():
        s = np.linalg.svd(np.asarray(upd.B) @ np.asarray(upd.A), compute_uv=False)
        for f, g in zip(full[lid][1:], half[lid][1:], strict=True):
            tail = float((s[f.rank:] ** 2).sum())
            assert f.err >= tail * (1 - 1e-9)  # quantisation only adds
            assert g.err == pytest.approx(tail + 0.5 * (f.err - tail), rel=1e-6, abs=1e-12)
            assert (g.rank, g.bits, g.nbytes) == (f.rank, f.bits, f.nbytes)
            assert g.distortion == f.err  # what is reported stays the measured error
        assert half[lid][0].err == full[lid][0].err  # leaving a layer out: all truncation
    with pytest.raises(CodecError, match="quant_weight"):
        AllocConfig(quant_weight=0.0)


def test_uniform_allocations_are_the_plain_baselines_smallest_first() -> None:
    from solar_edge.encode.allocate import uniform_allocations

    updates, bases, _ = _layers(7)
    fits = layer_options(updates, bases, {}, AllocConfig(max_rank=2, use_basis=False))
    named = uniform_allocations(fits, OVERHEAD)
    assert [n for n, _ in named if n.startswith("r6-")]  # the adapter's own rank, above max
    assert {n for n, _ in named} == {f"r{k}-int{b}" for k in (1, 2, 6) for b in (3, 4, 8)}
    sizes = [a.total_bytes for _, a in named]
    assert sizes == sorted(sizes)
    for name, alloc in named:
        rank, bits = (int(x) for x in name[1:].split("-int"))
        assert set(alloc.chosen) == set(updates)
        assert {(f.rank, f.bits) for f in alloc.chosen.values()} == {(rank, bits)}
        assert len(alloc.records) == len(updates)
    assert {n for n, _ in uniform_allocations(fits, OVERHEAD, bits=(8,))} == {"r1-int8",
                                                                              "r2-int8",
                                                                              "r6-int8"}


def test_the_adapters_own_factors_are_an_operating_point_above_max_rank() -> None:
    updates, bases, _ = _layers(7)
    fits = layer_options(updates, bases, {}, AllocConfig(max_rank=2, use_basis=False))
    for opts in fits.values():
        own = [f for f in opts if f.rank == 6]
        assert {f.bits for f in own} == {2, 3, 4, 5, 6, 8}
        int8 = next(f for f in own if f.bits == 8)
        assert int8.err < 1e-3 * opts[0].err  # full rank at 8 bits is nearly exact
