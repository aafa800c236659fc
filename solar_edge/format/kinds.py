"""Wire rules of each record kind: what its table entry may say and how many values follow.

The packet reader and writer check every layer-table entry against the rule of its kind
(:func:`rule_of`), and the device decoder checks a record's dimensions against the bundle
layer before it allocates anything (``dims``). A new record kind is one enum value in
:mod:`solar_edge.format.records`, one rule here and one decoder registered by its adapter
method (:mod:`solar_edge.methods`); readers that predate it refuse it at the kind check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from solar_edge.format.records import RecordKind


@dataclass(frozen=True)
class KindRule:
    """Constraints on one kind's ``(rows, cols, rank, positions, variant, epsilon)``."""

    positions: bool            # carries LEB128 positions (and then rank == 0)
    has_rank: bool             # 1 <= rank (else rank == 0)
    uses_epsilon: bool         # epsilon perturbs a bundle basis; else it must be 0
    uses_variant: bool         # variant means something (PRNG variant, VeRA key); else 0
    rank_within_shape: bool    # 1 <= rank <= min(rows, cols)
    shared_projections: bool   # all records of the kind in one packet share (rank, variant)
    dims: str                  # "basis": rows, cols <= the basis ranks; "weight": == (out, in);
    #                            "rows": rows == out, cols == 1; "head": the metadata's shape
    count: Callable[[int, int, int, int], int]  # (rows, cols, rank, positions) -> values


RULES: dict[RecordKind, KindRule] = {
    RecordKind.SPARSE_CORE: KindRule(
        positions=True, has_rank=False, uses_epsilon=True, uses_variant=True,
        rank_within_shape=False, shared_projections=False, dims="basis",
        count=lambda rows, cols, rank, pos: pos),
    RecordKind.FACTORED_CORE: KindRule(
        positions=False, has_rank=True, uses_epsilon=True, uses_variant=True,
        rank_within_shape=True, shared_projections=False, dims="basis",
        count=lambda rows, cols, rank, pos: (rows + cols) * rank),
    RecordKind.DENSE_FACTORS: KindRule(
        positions=False, has_rank=True, uses_epsilon=False, uses_variant=False,
        rank_within_shape=True, shared_projections=False, dims="weight",
        count=lambda rows, cols, rank, pos: (rows + cols) * rank),
    RecordKind.VERA_SCALES: KindRule(
        positions=False, has_rank=True, uses_epsilon=False, uses_variant=True,
        rank_within_shape=False, shared_projections=True, dims="weight",
        count=lambda rows, cols, rank, pos: rows + rank),
    RecordKind.HEAD_TENSOR: KindRule(
        positions=False, has_rank=False, uses_epsilon=False, uses_variant=False,
        rank_within_shape=False, shared_projections=False, dims="head",
        count=lambda rows, cols, rank, pos: rows * cols),
    RecordKind.BIAS_DELTA: KindRule(
        positions=False, has_rank=False, uses_epsilon=False, uses_variant=False,
        rank_within_shape=False, shared_projections=False, dims="rows",
        count=lambda rows, cols, rank, pos: rows * cols),
    RecordKind.MAGNITUDE_DELTA: KindRule(
        positions=False, has_rank=False, uses_epsilon=False, uses_variant=False,
        rank_within_shape=False, shared_projections=False, dims="rows",
        count=lambda rows, cols, rank, pos: rows * cols),
}


def rule_of(kind: RecordKind) -> KindRule:
    return RULES[RecordKind(kind)]


def value_count(kind: RecordKind, rows: int, cols: int, rank: int, positions: int) -> int:
    """Number of values a record of ``kind`` with these dimensions carries."""
    return rule_of(kind).count(rows, cols, rank, positions)
