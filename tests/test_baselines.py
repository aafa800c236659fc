"""The plain baselines (``solar_edge.encode.baselines``) and how the codec scores records it did
not fit (``allocate.scored_records``): what ``compress --max-drop`` holds its pick against."""

from __future__ import annotations

import numpy as np
import pytest

from solar_edge.decode import decode_factors
from solar_edge.encode.allocate import AllocConfig, allocation_of, layer_options, scored_records
from solar_edge.encode.baselines import (
    own_factor_records,
    plain_baselines,
    retruncated_records,
)
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.records import CodecHeader, RecordKind, ValueFormat
from solar_edge.methods.base import LayerUpdate

OUT, IN, RANK = 48, 40, 6


def _updates(seed: int = 0) -> dict[int, LayerUpdate]:
    rng = np.random.default_rng(seed)
    return {lid: LayerUpdate(f"layer{lid}",
                             rng.standard_normal((OUT, RANK)).astype(np.float32) * (lid + 1),
                             rng.standard_normal((RANK, IN)).astype(np.float32))
            for lid in (2, 5)}


def _bases(updates) -> dict[int, LayerBasis]:
    rng = np.random.default_rng(9)
    return {lid: LayerBasis(lid, np.linalg.qr(rng.standard_normal((OUT, 8)))[0].astype(np.float32),
                            np.linalg.qr(rng.standard_normal((IN, 8)))[0].astype(np.float32))
            for lid in updates}


def _product(record) -> np.ndarray:
    L, Rt = decode_factors(record, None, CodecHeader(seed=0))
    return L.astype(np.float64) @ Rt.astype(np.float64).T


def _dw(u: LayerUpdate) -> np.ndarray:
    return u.B.astype(np.float64) @ u.A.astype(np.float64)


def test_own_factors_are_the_adapters_factors_quantised():
    updates = _updates()
    for fmt, tol in ((ValueFormat.INT8, 0.02), (ValueFormat.INT4, 0.3)):
        records = own_factor_records(updates, fmt)
        assert [r.layer_id for r in records] == [2, 5]
        for r in records:
            u = updates[r.layer_id]
            assert (r.kind, r.rank, r.values.fmt) == (RecordKind.DENSE_FACTORS, RANK, fmt)
            L, Rt = decode_factors(r, None, CodecHeader(seed=0))
            assert np.abs(L - u.B).max() <= tol * np.abs(u.B).max()
            assert np.abs(Rt - u.A.T).max() <= tol * np.abs(u.A).max()


def test_retruncation_keeps_the_top_singular_directions():
    updates = _updates()
    k = 2
    for r in retruncated_records(updates, _bases(updates), k, ValueFormat.INT8):
        dw = _dw(updates[r.layer_id])
        s = np.linalg.svd(dw, compute_uv=False)
        err = np.linalg.norm(dw - _product(r)) ** 2
        tail = float((s[k:] ** 2).sum())  # the best rank-k error (Eckart-Young)
        assert r.rank == k and tail <= err <= 1.05 * tail


def test_every_baseline_is_named_and_ranks_stop_at_the_adapters_own():
    updates = _updates()
    names = [name for name, _ in plain_baselines(updates, _bases(updates))]
    assert names == ["own-int8", "own-int4", "own-int3", "r1-int4", "r1-int8", "r2-int4",
                     "r2-int8", "r4-int4", "r4-int8", "r6-int4", "r6-int8"]


def test_a_record_made_elsewhere_is_scored_in_the_allocators_metric():
    updates = _updates()
    records = own_factor_records(updates, ValueFormat.INT4)
    fro = scored_records(updates, records, {})
    for r in records:
        want = np.linalg.norm(_dw(updates[r.layer_id]) - _product(r)) ** 2
        assert fro[r.layer_id].err == pytest.approx(want, rel=1e-6)
        assert (fro[r.layer_id].rank, fro[r.layer_id].bits) == (RANK, 4)
    # an input Gram that weighs only the first input coordinate: tr(E G E^T) = |E[:, 0]|^2
    gram = np.zeros((IN, IN))
    gram[0, 0] = 1.0
    weighed = scored_records(updates, records, {2: gram})
    e = _dw(updates[2]) - _product(records[0])
    ridge = 1e-4 * (1 / IN)  # Whitener's ridge, relative to the mean eigenvalue
    want = float((e[:, 0] ** 2).sum() + ridge * (e ** 2).sum())
    assert weighed[2].err == pytest.approx(want, rel=1e-6)


def test_an_allocation_of_baseline_records_reports_their_errors():
    updates = _updates()
    options = layer_options(updates, _bases(updates), {}, AllocConfig(max_rank=2))
    records = own_factor_records(updates, ValueFormat.INT8)
    alloc = allocation_of(options, scored_records(updates, records, {}), overhead_bytes=100)
    assert alloc.records == records
    assert alloc.total_bytes == 100 + sum(f.nbytes for f in alloc.chosen.values())
    assert 0 < alloc.total_error < 0.02  # int8 factors: nearly the whole update
    only_one = allocation_of(options, scored_records(updates, records[:1], {}), 100)
    assert only_one.records == records[:1]
    assert only_one.chosen[5].kind is None and only_one.layer_error(5) == 1.0
