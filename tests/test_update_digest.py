"""The update digest (solar_edge/regen/update_digest.py): what it tells apart, what it lets
pass, and the growth bound that decides whether the slot mechanisms skip the forward pass."""

from __future__ import annotations

import numpy as np
import pytest

from solar_edge.regen import update_digest as ud
from solar_edge.regen.update_digest import LayerUpdate
from solar_edge.runtime.patching import MAX_GROWTH, LayerPatch, within_growth

TOL = ud.DEFAULT_TOLERANCE


def _factors(seed: int, out: int = 48, inp: int = 32, k: int = 4):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.02, (out, k)).astype(np.float32),
            rng.normal(0, 0.02, (inp, k)).astype(np.float32))


def _updates():
    return [LayerUpdate(0, _factors(0), None, None), LayerUpdate(1, _factors(1), None, None),
            LayerUpdate(2, _factors(2), np.full(48, 1.01, np.float32),
                        np.linspace(-0.1, 0.1, 48, dtype=np.float32))]


def test_the_layer_row_is_the_projection_of_dw():
    """For dW = e_i e_j^T the row is p[i] * u[j]: the digest reads dW's entries through the
    layer's own ±1 vectors (and not, e.g., dW transposed)."""
    left = np.zeros((48, 1), np.float32)
    right_t = np.zeros((32, 1), np.float32)
    left[5, 0], right_t[7, 0] = 2.0, 3.0
    got = ud.digest([LayerUpdate(3, (left, right_t), None, None)], None)
    p, u = ud.probe_vectors(3, 48, 0), ud.probe_vectors(3, 32, 1)
    assert set(np.unique(p)) == {-1.0, 1.0}
    np.testing.assert_allclose(got[0], 6.0 * p[5] * u[7], rtol=1e-4)
    assert got[1] == [0.0] * 4 and got[2] == [0.0] * 4


def test_float32_noise_passes_and_rounding_stays_inside_the_tolerance():
    want = ud.digest(_updates(), np.array([0.3, -1.2]))
    noisy = [LayerUpdate(u.layer_id, tuple(f * np.float32(1 + 1e-6) for f in u.factors),
                         u.scale, u.bias) for u in _updates()]
    assert ud.mismatch(ud.digest(noisy, np.array([0.3, -1.2])), want, TOL) is None


@pytest.mark.parametrize("change", ["swap layers", "drop a layer", "flip a column",
                                    "one coefficient", "scale", "bias", "head", "nan"])
def test_what_the_digest_tells_apart(change):
    ups = _updates()
    head = np.array([0.3, -1.2])
    want = ud.digest(ups, head)
    if change == "swap layers":  # layer 0's update landing on layer 1 (same shape) and back
        ups[0], ups[1] = (LayerUpdate(0, ups[1].factors, None, None),
                          LayerUpdate(1, ups[0].factors, None, None))
    elif change == "drop a layer":
        ups = ups[1:]
    elif change == "flip a column":
        left, right_t = ups[1].factors
        left = left.copy()
        left[:, 2] *= -1
        ups[1] = LayerUpdate(1, (left, right_t), None, None)
    elif change == "one coefficient":  # one entry of one factor moved by its whole size
        left, right_t = ups[0].factors
        right_t = right_t.copy()
        i = np.unravel_index(np.abs(right_t).argmax(), right_t.shape)
        right_t[i] *= 2
        ups[0] = LayerUpdate(0, (left, right_t), None, None)
    elif change == "scale":
        ups[2] = LayerUpdate(2, ups[2].factors, ups[2].scale * np.float32(1.01), ups[2].bias)
    elif change == "bias":
        ups[2] = LayerUpdate(2, ups[2].factors, ups[2].scale, ups[2].bias[::-1].copy())
    elif change == "head":
        head = head[::-1].copy()
    elif change == "nan":
        left, right_t = ups[0].factors
        left = left.copy()
        left[0, 0] = np.nan
        ups[0] = LayerUpdate(0, (left, right_t), None, None)
    problem = ud.mismatch(ud.digest(ups, head), want, TOL)
    assert problem is not None, change


def test_a_digest_of_another_shape_is_a_mismatch_not_a_crash():
    want = ud.digest(_updates(), None)
    assert "shape" in ud.mismatch(want[:2], want, TOL)


def test_the_growth_bound():
    left, right_t = _factors(0)
    sigma1 = 1.0
    assert within_growth(LayerPatch((left, right_t)), sigma1, 0.0)
    big = (left * np.float32(1e4), right_t)
    assert not within_growth(LayerPatch(big), sigma1, 0.0)
    assert not within_growth(LayerPatch((left, right_t)), 0.0, 0.0)  # no singular values
    assert not within_growth(LayerPatch(scale=np.full(48, MAX_GROWTH * 2, np.float32)), 1, 0.0)
    bias = np.full(48, 2 * MAX_GROWTH, np.float32)
    assert not within_growth(LayerPatch(bias=bias), 1.0, 0.0)  # 2x the bound of 1 + 0
    assert within_growth(LayerPatch(bias=bias), 1.0, 2.0)  # max |b0| = 2: bound 8 * 3
    huge = (np.full((48, 1), 1e19, np.float32), np.full((32, 1), 1e19, np.float32))
    assert not within_growth(LayerPatch(huge), 1e3, 0.0)  # its norm overflows float32
