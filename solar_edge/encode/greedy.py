"""Global byte allocation across layers: one operating point per layer under a byte budget.

Generic over what a point is (:class:`RatePoint`: bytes and the distortion it leaves). Used by
both encoders (:mod:`solar_edge.encode.solar`, :mod:`solar_edge.encode.allocate`). Greedy
along each layer's lower convex hull by distortion drop per byte, then a fill pass with the
single-layer upgrade of largest drop that still fits, until none does.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar


class RatePoint(Protocol):
    """An operating point of one layer: what it costs and the distortion it leaves."""

    @property
    def nbytes(self) -> int: ...

    @property
    def err(self) -> float: ...


P = TypeVar("P", bound=RatePoint)


def lower_hull(points: Sequence[P]) -> list[P]:
    """Lower convex hull in (bytes, err) from the cheapest point, err strictly decreasing."""
    hull: list[P] = []
    for o in sorted(points, key=lambda o: (o.nbytes, o.err)):
        if hull and o.err >= hull[-1].err:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above segment a -> o
            if (b.err - a.err) * (o.nbytes - a.nbytes) >= (o.err - a.err) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def allocate_greedy(pools: Mapping[int, Sequence[P]], start: Mapping[int, P],
                    avail: int) -> dict[int, P]:
    """Upgrade layers from ``start`` within ``avail`` extra bytes.

    Greedy along each layer's lower hull by error drop per byte, then a fill pass that takes
    the single-layer upgrade with the largest drop that still fits, until none does.
    """
    chosen = dict(start)
    hulls = {lid: lower_hull(opts) for lid, opts in pools.items()}
    left = avail
    heap: list[tuple[float, int, int]] = []

    def push(lid: int, pos: int) -> None:
        hull = hulls[lid]
        if pos + 1 < len(hull):
            cur, nxt = hull[pos], hull[pos + 1]
            slope = (cur.err - nxt.err) / max(nxt.nbytes - cur.nbytes, 1)
            heapq.heappush(heap, (-slope, lid, pos + 1))

    for lid in hulls:
        push(lid, 0)
    while heap:
        _, lid, pos = heapq.heappop(heap)
        step = hulls[lid][pos]
        extra = step.nbytes - chosen[lid].nbytes
        if extra <= left:
            left -= extra
            chosen[lid] = step
            push(lid, pos)
    while True:
        upgrade: tuple[float, int, P] | None = None
        for lid, opts in pools.items():
            cur = chosen[lid]
            for o in opts:
                if o.err < cur.err and o.nbytes - cur.nbytes <= left:
                    gain = cur.err - o.err
                    if upgrade is None or gain > upgrade[0]:
                        upgrade = (gain, lid, o)
        if upgrade is None:
            return chosen
        _, lid, o = upgrade
        left -= o.nbytes - chosen[lid].nbytes
        chosen[lid] = o
