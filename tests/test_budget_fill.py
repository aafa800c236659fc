"""``fill_budget``: the largest allocation budget whose written packet still fits."""

import pytest

from solar_edge.exporters.budget_fill import fill_budget


def _compressed(ratio: float, fixed: int):
    calls: list[int] = []

    def size(b: int) -> int:
        calls.append(b)
        return fixed + int((b - fixed) * ratio)
    return size, calls


@pytest.mark.parametrize("ratio", [0.6, 0.87, 0.999, 1.0])
def test_largest_allocation_whose_packet_fits(ratio: float) -> None:
    size, calls = _compressed(ratio, 400)
    budget, ceiling = 10_000, 40_000
    got = fill_budget(size, budget, ceiling)
    assert size(got) <= budget < size(got + 1)
    assert len(calls) < 20  # bisection, not a scan


def test_ceiling_that_fits_keeps_everything_and_a_low_ceiling_is_the_budget() -> None:
    size, _ = _compressed(0.5, 400)
    assert fill_budget(size, 10_000, 15_000) == 15_000
    assert fill_budget(size, 10_000, 9_000) == 10_000
