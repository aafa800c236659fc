"""``compress --budget`` counts the bytes of the written packet, not an uncompressed bound.

The allocator budgets records at their uncompressed size (:mod:`solar_edge.encode.allocate`),
and the writer then compresses the body with zstd when that is smaller, so a packet allocated
at ``B`` comes out 5-15 % under ``B``. :func:`fill_budget` finds the largest allocation budget
whose signed packet still fits: the user's bytes buy as much of the adapter as they can.
"""

from __future__ import annotations

from collections.abc import Callable


def fill_budget(packet_bytes: Callable[[int], int], budget: int, ceiling: int) -> int:
    """Largest allocation budget ``b`` in ``[budget, ceiling]`` with ``packet_bytes(b) <= budget``
    (bisection; ``packet_bytes(budget) <= budget`` holds because the uncompressed size is a
    bound). ``ceiling``: the allocation that keeps everything; returned if it fits."""
    if ceiling <= budget:
        return budget
    if packet_bytes(ceiling) <= budget:
        return ceiling
    lo, hi = budget, ceiling  # invariant: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if packet_bytes(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
