"""Global byte allocation across layers, and the activation-aware encoder built on it.

Every layer offers operating points ``(bytes, distortion)`` (:mod:`solar_edge.encode.actaware`:
left out, or rank ``k`` at ``b`` bits, plain or in W0's singular basis). The allocator picks
one point per layer so that ``overhead + sum(bytes) <= budget`` and the *sum* of distortions
over layers is small: greedy along each layer's lower convex hull, largest distortion drop
per byte first, then a fill pass with single-layer upgrades that still fit. Layers whose
update barely moves their outputs get rank 0 (no record) first; others rank 1-2 at few bits.

:func:`layer_options` gives every layer's points; :func:`allocation_for_budget` (or
:func:`allocation_for_error`, bisection on the budget) picks them, on the summed distortions
or, with ``balance`` (the data-free default of ``solar-edge compress``), on each layer's
distortion relative to its own (:func:`balanced`). The result is an :class:`Allocation`:
its ``records`` (for :func:`solar_edge.format.writer.encode_packet`), per-layer bytes and
measured errors. :func:`encode_adapter` runs both steps unbalanced in one call.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from solar_edge.decode import decode_factors
from solar_edge.encode.actaware import LayerFit, Whitener, fit_layer, weighted_sq_error
from solar_edge.encode.greedy import allocate_greedy
from solar_edge.errors import BudgetError, CodecError
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import DEFAULT_PACKET_OVERHEAD, record_nbytes
from solar_edge.format.records import CodecHeader, LayerRecord, ValueFormat
from solar_edge.methods.base import LayerUpdate

DEFAULT_FORMATS = (ValueFormat.INT2, ValueFormat.INT3, ValueFormat.INT4, ValueFormat.INT5,
                   ValueFormat.INT6, ValueFormat.INT8)


@dataclass(frozen=True)
class AllocConfig:
    max_rank: int = 4
    formats: tuple[ValueFormat, ...] = DEFAULT_FORMATS
    group_size: int = 64
    use_basis: bool = True            # also try W0's singular-basis coordinates per layer
    overhead_bytes: int = DEFAULT_PACKET_OVERHEAD
    quant_weight: float = 1.0         # weight of quantisation error against truncation error

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise CodecError(f"max_rank must be >= 1, got {self.max_rank}")
        if not self.formats or any(not ValueFormat(f).is_integer for f in self.formats):
            raise CodecError("formats must be integer value formats")
        if not 1 <= self.group_size <= 0xFFFF:
            raise CodecError(f"group_size must be in 1..65535, got {self.group_size}")
        if not 0 < self.quant_weight <= 1:
            raise CodecError(f"quant_weight must be in (0, 1], got {self.quant_weight}")


@dataclass
class Allocation:
    """Chosen point per layer; ``err``/``e0`` are distortions in the allocation metric."""

    chosen: dict[int, LayerFit]
    e0: dict[int, float]         # each layer's distortion left out (its whole update)
    overhead_bytes: int
    records: list[LayerRecord] = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        return sum(f.nbytes for f in self.chosen.values())

    @property
    def total_bytes(self) -> int:
        """Uncompressed packet size (zstd in the packet can only make it smaller)."""
        return self.overhead_bytes + self.payload_bytes

    def layer_error(self, lid: int) -> float:
        """Relative error of one layer: ``sqrt(err / e0)``."""
        e0 = self.e0[lid]
        return float(np.sqrt(self.chosen[lid].distortion / e0)) if e0 > 0 else 0.0

    @property
    def total_error(self) -> float:
        """``sqrt(sum err / sum e0)`` over layers: the adapter's relative error."""
        e0 = sum(self.e0.values())
        return float(np.sqrt(sum(f.distortion for f in self.chosen.values()) / e0)) \
            if e0 > 0 else 0.0


def allocate(options: Mapping[int, Sequence[LayerFit]], avail: int,
             cover: bool = False) -> dict[int, LayerFit]:
    """One point per layer with ``sum(nbytes) <= avail`` (each layer's first option costs 0).

    ``cover``: when every layer that has an update can get its cheapest record within
    ``avail``, no such layer is left out (the greedy starts from those records)."""
    chosen = {lid: min(opts, key=lambda f: f.nbytes) for lid, opts in options.items()}
    if any(f.nbytes for f in chosen.values()):
        raise CodecError("every layer needs a zero-byte 'left out' option")
    start = covering(options) if cover else {}
    spent = sum(f.nbytes for f in start.values())
    if not start or spent > avail:
        return allocate_greedy(options, chosen, avail)
    pools = {lid: [f for f in opts if f.kind is not None] if lid in start else opts
             for lid, opts in options.items()}
    return allocate_greedy(pools, {**chosen, **start}, avail - spent)


def covering(options: Mapping[int, Sequence[LayerFit]]) -> dict[int, LayerFit]:
    """Each layer's cheapest record (least error among the cheapest), for every layer whose
    update is not zero: the smallest allocation that leaves no such layer out."""
    out = {}
    for lid, opts in options.items():
        kept = [f for f in opts if f.kind is not None]
        if kept and opts[0].err > 0:
            out[lid] = min(kept, key=lambda f: (f.nbytes, f.err))
    return out


def layer_options(updates: Mapping[int, LayerUpdate], bases: Mapping[int, LayerBasis],
                  grams: Mapping[int, np.ndarray | None], config: AllocConfig,
                  out_grams: Mapping[int, np.ndarray] | None = None,
                  ) -> dict[int, list[LayerFit]]:
    """Every layer's operating points (the expensive part: fit once, allocate many times).

    Small matrices: one BLAS thread (threadpoolctl, when installed) avoids oversubscription."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up only
        return _layer_options(updates, bases, grams, config, out_grams or {})
    with threadpool_limits(limits=1, user_api="blas"):
        return _layer_options(updates, bases, grams, config, out_grams or {})


def _layer_options(updates: Mapping[int, LayerUpdate], bases: Mapping[int, LayerBasis],
                   grams: Mapping[int, np.ndarray | None], config: AllocConfig,
                   out_grams: Mapping[int, np.ndarray]) -> dict[int, list[LayerFit]]:
    options = {}
    for lid, upd in sorted(updates.items()):
        n_in = int(np.asarray(upd.A).shape[1])
        w = Whitener.from_gram(grams.get(lid), n_in)
        basis = bases.get(lid) if config.use_basis else None
        left = None
        if lid in out_grams:
            left = Whitener.from_gram(out_grams[lid], int(np.asarray(upd.B).shape[0]), 1e-3)
        options[lid] = fit_layer(upd, lid, w, max_rank=config.max_rank, formats=config.formats,
                                 group=config.group_size, basis=basis, left=left,
                                 quant_weight=config.quant_weight)
    return options


def scored_records(updates: Mapping[int, LayerUpdate], records: Sequence[LayerRecord],
                   grams: Mapping[int, np.ndarray | None],
                   out_grams: Mapping[int, np.ndarray] | None = None,
                   metric: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = None,
                   ) -> dict[int, LayerFit]:
    """Plain-factor ``records`` made elsewhere (:mod:`solar_edge.encode.baselines`) as the
    :class:`LayerFit` each is, its distortion in the metric :func:`layer_options` uses.
    ``metric``: a dict kept between calls, so each layer's (regularised) Grams are formed
    once for many record sets."""
    metric = {} if metric is None else metric
    out = {}
    for rec in records:
        lid = rec.layer_id
        upd = updates[lid]
        B, A = np.asarray(upd.B, np.float64), np.asarray(upd.A, np.float64)
        if lid not in metric:
            left = None
            if out_grams and lid in out_grams:
                left = Whitener.from_gram(out_grams[lid], B.shape[0], 1e-3).gram
            metric[lid] = (Whitener.from_gram(grams.get(lid), A.shape[1]).gram, left)
        gram, left = metric[lid]
        lf, rf = decode_factors(rec, None, CodecHeader(seed=0))
        err = weighted_sq_error(B, A, lf.astype(np.float64), rf.astype(np.float64), gram, left)
        out[rec.layer_id] = LayerFit(rec.layer_id, rec.rank, rec.values.fmt.bits, rec.kind,
                                     record_nbytes(rec), err, rec)
    return out


def allocation_of(options: Mapping[int, Sequence[LayerFit]], chosen: Mapping[int, LayerFit],
                  overhead_bytes: int) -> Allocation:
    """An :class:`Allocation` of points chosen outside the allocator (a layer without one
    is left out)."""
    picked = {lid: chosen.get(lid, opts[0]) for lid, opts in options.items()}
    e0 = {lid: opts[0].distortion for lid, opts in options.items()}
    records = [f.record for _, f in sorted(picked.items()) if f.record is not None]
    return Allocation(picked, e0, overhead_bytes, records)


def balanced(options: Mapping[int, Sequence[LayerFit]]) -> dict[int, list[LayerFit]]:
    """Each layer's distortions divided by its own ``e0`` (what leaving it out costs), so
    every layer counts alike: the data-free objective (a layer whose update is large is not
    more important to the task for it)."""
    out = {}
    for lid, opts in options.items():
        e0 = opts[0].err
        out[lid] = [replace(f, err=f.err / e0 if e0 > 0 else 0.0) for f in opts]
    return out


def mean_relative_error(chosen: Mapping[int, LayerFit], e0: Mapping[int, float]) -> float:
    """``mean_l err_l / e0_l``: the balanced objective's value."""
    terms = [f.err / e0[lid] for lid, f in chosen.items() if e0[lid] > 0]
    return float(np.mean(terms)) if terms else 0.0


def _allocation(options: Mapping[int, Sequence[LayerFit]], chosen_idx: Mapping[int, int],
                overhead_bytes: int) -> Allocation:
    return allocation_of(options, {lid: options[lid][i] for lid, i in chosen_idx.items()},
                         overhead_bytes)


def uniform_baselines(options: Mapping[int, Sequence[LayerFit]], avail: int
                      ) -> list[dict[int, int]]:
    """The plain baselines inside a byte budget: every layer at one rank and one bit width
    (rank re-truncation, or the adapter's own factors at b bits), as option indices."""
    keys = sorted({(f.rank, f.bits) for opts in options.values() for f in opts if f.kind})
    out = []
    for key in keys:
        pick: dict[int, int] = {}
        for lid, opts in options.items():
            idx = [i for i, f in enumerate(opts) if f.kind and (f.rank, f.bits) == key]
            if not idx:  # a layer of lower rank: its highest rank at that width
                same = [i for i, f in enumerate(opts) if f.kind and f.bits == key[1]
                        and f.rank <= key[0]]
                idx = sorted(same, key=lambda i: opts[i].rank)[-1:]
            if not idx:
                break
            pick[lid] = idx[0]
        if len(pick) == len(options) and sum(options[lid][i].nbytes
                                              for lid, i in pick.items()) <= avail:
            out.append(pick)
    return out


def uniform_allocations(options: Mapping[int, Sequence[LayerFit]], overhead_bytes: int,
                        bits: Sequence[int] = (3, 4, 8)) -> list[tuple[str, Allocation]]:
    """The plain baselines at ``bits`` (every layer at one rank and one width, named
    ``r<rank>-int<bits>``), smallest first: the candidates an accuracy-targeted search holds
    its own pick against."""
    out = []
    for pick in uniform_baselines(options, sys.maxsize):
        rank, width = max((options[lid][i].rank, options[lid][i].bits) for lid, i in pick.items())
        if width in bits:
            out.append((f"r{rank}-int{width}", _allocation(options, pick, overhead_bytes)))
    return sorted(out, key=lambda named: named[1].total_bytes)


def allocation_for_budget(options: Mapping[int, Sequence[LayerFit]], budget_bytes: int,
                          overhead_bytes: int, balance: bool = False,
                          cover: bool = False) -> Allocation:
    """One point per layer within the budget. ``balance``: the data-free objective
    (:func:`balanced`), with a fall back to the best uniform baseline when the greedy
    allocation predicts worse than it. ``cover``: see :func:`allocate`."""
    avail = budget_bytes - overhead_bytes
    smallest = min((f.nbytes for opts in options.values() for f in opts if f.kind), default=None)
    if smallest is None or avail < smallest:
        least = "" if smallest is None else f": give at least {overhead_bytes + smallest} B"
        raise BudgetError(f"budget {budget_bytes} B cannot hold the {overhead_bytes} B overhead "
                          f"plus one smallest record ({smallest} B){least}")
    pools = balanced(options) if balance else options
    index = {id(f): i for opts in pools.values() for i, f in enumerate(opts)}
    chosen_idx = {lid: index[id(f)] for lid, f in allocate(pools, avail, cover).items()}
    if not balance:
        return _allocation(options, chosen_idx, overhead_bytes)
    candidates = [chosen_idx, *uniform_baselines(options, avail)]

    def objective(pick: Mapping[int, int]) -> float:
        return float(sum(pools[lid][i].err for lid, i in pick.items()))

    return _allocation(options, min(candidates, key=objective), overhead_bytes)


def largest_bytes(options: Mapping[int, Sequence[LayerFit]], overhead_bytes: int) -> int:
    """The uncompressed size of the packet that keeps every layer's largest point."""
    return overhead_bytes + sum(max(f.nbytes for f in opts) for opts in options.values())


def allocation_for_error(options: Mapping[int, Sequence[LayerFit]], max_error: float,
                         overhead_bytes: int, balance: bool = False,
                         cover: bool = False) -> Allocation:
    """Smallest budget (bisection) whose allocation has ``total_error <= max_error``."""
    if not max_error >= 0:
        raise CodecError(f"max_error must be >= 0, got {max_error}")
    hi = largest_bytes(options, overhead_bytes)
    best = allocation_for_budget(options, hi, overhead_bytes, balance, cover)
    if best.total_error > max_error:
        raise BudgetError(f"even the largest packet ({best.total_bytes} B) has error "
                          f"{best.total_error:.4g} > {max_error:.4g}")
    lo = overhead_bytes + min(f.nbytes for opts in options.values() for f in opts if f.kind) - 1
    while hi - lo > 1:  # invariant: allocation at hi meets the bound, at lo it does not
        mid = (lo + hi) // 2
        alloc = allocation_for_budget(options, mid, overhead_bytes, balance, cover)
        if alloc.total_error <= max_error:
            hi, best = mid, alloc
        else:
            lo = mid
    return best


def encode_adapter(updates: Mapping[int, LayerUpdate], bases: Mapping[int, LayerBasis],
                   grams: Mapping[int, np.ndarray | None], config: AllocConfig, *,
                   budget_bytes: int | None = None,
                   max_error: float | None = None,
                   out_grams: Mapping[int, np.ndarray] | None = None) -> Allocation:
    """The :class:`Allocation` (records, bytes and errors) of one adapter under
    ``budget_bytes`` or meeting ``max_error`` (exactly one), on the summed per-layer
    distortions: ``grams`` / ``out_grams`` weigh them (empty: Frobenius). Not balanced: the
    compress pipeline calls :func:`layer_options` and ``allocation_for_*(..., balance=True)``
    itself for its data-free default."""
    if (budget_bytes is None) == (max_error is None):
        raise CodecError("give exactly one of budget_bytes and max_error")
    options = layer_options(updates, bases, grams, config, out_grams)
    if budget_bytes is not None:
        return allocation_for_budget(options, budget_bytes, config.overhead_bytes)
    assert max_error is not None
    return allocation_for_error(options, max_error, config.overhead_bytes)
