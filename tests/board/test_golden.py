"""The cross-platform contract against the golden files written on x86-64 (board test set).

Exact items (PRNG words, perturbations, perturbed columns, heads, VeRA projections,
element-wise decodes) must hash the same; factored and sparse cores must be within
``solar_edge.decode.factor_bound`` of the x86-64 factors (docs/packet-format.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from golden_cases import compare, compute, summary, synthetic_records, within_bound

from solar_edge.decode import _leading_columns, _split_factors, decode_factors, factor_bound
from solar_edge.errors import CodecError
from solar_edge.format.records import CodecHeader, PerturbationKind, PrngKind, RecordKind

CODEC = CodecHeader(seed=0x5EED, prng=PrngKind.PHILOX4X32_10,
                    perturbation=PerturbationKind.RADEMACHER)


@pytest.fixture(scope="module")
def computed():
    return compute()


def test_every_golden_item_identical_or_within_tolerance(computed):
    rows = compare(computed)
    assert len(rows) > 300
    bad = [r for r in rows if r[1] == "DIFFERS"]
    assert not bad, summary(rows)
    exact = [r for r in rows if not r[0].startswith(("synthetic", "golden.slr"))]
    assert {r[1] for r in exact} == {"identical"}


def test_a_flipped_bit_in_an_exact_item_is_reported(computed):
    name = next(k for k in computed.exact if k.startswith("columns"))
    changed = computed.exact[name].copy()
    changed.view(np.uint32).flat[3] ^= 1
    computed.exact[name], kept = changed, computed.exact[name]
    try:
        status = {r[0]: r[1] for r in compare(computed)}[name]
    finally:
        computed.exact[name] = kept
    assert status == "DIFFERS"


def _orders(cols: np.ndarray, coef: np.ndarray) -> dict[str, np.ndarray]:
    """The same float32 product summed in other orders than BLAS's."""
    fwd = np.zeros((cols.shape[0], coef.shape[1]), np.float32)
    for k in range(coef.shape[0]):
        fwd += cols[:, k:k + 1] * coef[k]
    rev = np.zeros_like(fwd)
    for k in reversed(range(coef.shape[0])):
        rev += cols[:, k:k + 1] * coef[k]
    wide = (cols.astype(np.float64) @ coef.astype(np.float64)).astype(np.float32)
    return {"forward": fwd, "reverse": rev, "float64 rounded once": wide}


def test_factor_bound_admits_other_summation_orders_and_catches_more():
    for rec, basis in synthetic_records():
        if rec.kind != RecordKind.FACTORED_CORE:
            continue
        blas_l, _ = decode_factors(rec, basis, CODEC)
        bound_l, _ = factor_bound(rec, basis, CODEC)
        a, _ = _split_factors(rec, rec.values.dequantize())
        cols = np.ascontiguousarray(_leading_columns(rec, basis, CODEC, "U", rec.rows))
        for order, other in _orders(cols, a).items():
            assert within_bound(other, blas_l, bound_l)[0], order
        # an error of 4x the bound in one element is caught
        off = blas_l.astype(np.float64)
        off[5, 1] += 4 * bound_l[5, 1] + 1e-30
        assert not within_bound(off.astype(np.float32), blas_l, bound_l)[0]
        assert 0 < float(bound_l.max()) < 1e-4 * float(np.abs(blas_l).max())


def test_sparse_bound_zero_on_the_gathered_side():
    rec, basis = synthetic_records()[-1]
    assert rec.kind == RecordKind.SPARSE_CORE
    bounds = factor_bound(rec, basis, CODEC)
    factors = decode_factors(rec, basis, CODEC)
    assert [b.shape for b in bounds] == [f.shape for f in factors]
    assert sum(int(np.count_nonzero(b)) == 0 for b in bounds) == 1


def test_factor_bound_refuses_kinds_without_a_product():
    rec, basis = synthetic_records()[0]
    dense = type(rec)(layer_id=rec.layer_id, kind=RecordKind.DENSE_FACTORS, rows=4, cols=3,
                      rank=1, values=rec.values, variant=0)
    with pytest.raises(CodecError, match="no product"):
        factor_bound(dense, basis, CODEC)
