"""Packet v1 as objects: header, limits, and the checks the reader and the writer share.

Bytes <-> :class:`Packet` is :func:`solar_edge.format.writer.encode_packet` and
:func:`solar_edge.format.reader.decode_packet` (spec: docs/packet-format.md); the writer
applies every check the reader applies, so it never writes a packet a reader rejects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from solar_edge.errors import InvalidFieldError, LimitExceededError
from solar_edge.format import bitpack
from solar_edge.format.ids import ID_RULE, MAX_ID_BYTES, is_valid_id
from solar_edge.format.kinds import rule_of
from solar_edge.format.layout import FINGERPRINT_BYTES, MAX_GROUP_SIZE, values_nbytes
from solar_edge.format.metadata import check_metadata
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    PrngKind,
    RecordKind,
    ValueFormat,
)

MAX_METADATA_BYTES = 4096


@dataclass(frozen=True)
class PacketLimits:
    """Every limit a reader enforces, in one place (a device profile may lower them)."""

    max_packet_bytes: int = 16 * 2**20
    max_body_bytes: int = 64 * 2**20  # after decompression
    max_layers: int = 4096
    max_values_per_layer: int = 2**24
    # over all records: a small zstd frame can declare a large, valid body, and each value
    # costs the reader at least one byte (int8 codes) however densely it was packed
    max_values_per_packet: int = 2**25
    max_positions_per_layer: int = 2**22
    max_rows: int = 2**16
    max_cols: int = 2**16
    max_rank: int = 4096
    max_metadata_bytes: int = MAX_METADATA_BYTES
    # values of the projections a device regenerates for shared-projection kinds (VeRA:
    # rank * (max rows + max cols)); 2**23 float32 values are 32 MiB
    max_projection_values: int = 2**23


@dataclass(frozen=True)
class PacketHeader:
    """Who the packet is for and what it is: base bundle, adapter identity, metadata."""

    fingerprint: bytes  # SHA-256 of the base bundle manifest
    adapter_id: str  # see solar_edge.format.ids
    adapter_version: int  # 1..2**64-2, monotonic per adapter id (anti-rollback)
    metadata: dict[str, Any] = field(default_factory=dict)  # task name, labels, head seed


@dataclass(frozen=True)
class Packet:
    header: PacketHeader
    codec: CodecHeader
    records: list[LayerRecord]
    key_id: bytes
    signature: bytes
    compressed: bool = False


class Entry(NamedTuple):
    """One layer-table entry as it is on the wire (``layout.ENTRY``)."""

    layer_id: int
    kind: int
    fmt: int
    variant: int
    rank: int
    rows: int
    cols: int
    epsilon: float
    position_count: int
    positions_bytes: int
    group_size: int


# Version 0 means "nothing installed" and 2**64 - 1 could never be superseded.
MIN_ADAPTER_VERSION = 1
MAX_ADAPTER_VERSION = 2**64 - 2


def check_adapter_id(raw: bytes) -> str:
    if not 1 <= len(raw) <= MAX_ID_BYTES:
        raise InvalidFieldError(f"length {len(raw)} not in 1..{MAX_ID_BYTES}",
                                field="header.adapter_id")
    text = raw.decode("ascii", errors="replace")
    if not is_valid_id(text):
        raise InvalidFieldError(f"{text!r}: {ID_RULE}", field="header.adapter_id")
    return text


def check_adapter_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or \
            not MIN_ADAPTER_VERSION <= version <= MAX_ADAPTER_VERSION:
        raise InvalidFieldError(f"{version!r} not in {MIN_ADAPTER_VERSION}..2**64-2",
                                field="header.adapter_version")
    return version


def check_header(header: PacketHeader, codec: CodecHeader) -> None:
    """The writer's checks of a header it is given (the reader checks each field as read)."""
    if not isinstance(header.fingerprint, bytes) or len(header.fingerprint) != FINGERPRINT_BYTES:
        raise InvalidFieldError("must be 32 bytes", field="header.fingerprint")
    if not isinstance(header.adapter_id, str):
        raise InvalidFieldError("must be a string", field="header.adapter_id")
    try:
        check_adapter_id(header.adapter_id.encode("ascii"))
    except UnicodeEncodeError as exc:
        raise InvalidFieldError(f"{header.adapter_id!r}: {ID_RULE}",
                                field="header.adapter_id") from exc
    check_adapter_version(header.adapter_version)
    check_metadata(header.metadata)
    if not 0 <= codec.seed < 2**64:
        raise InvalidFieldError("must fit in u64", field="codec.seed")
    enum_value(PrngKind, int(codec.prng), "codec.prng")
    enum_value(PerturbationKind, int(codec.perturbation), "codec.perturbation")


def enum_value(cls: type, value: int, name: str) -> Any:
    try:
        return cls(value)
    except ValueError as exc:
        raise InvalidFieldError(f"unknown value {value}", field=name) from exc


def check_range(value: int, low: int, limit: int, name: str) -> None:
    """``value`` below ``low`` is invalid; above the reader's ``limit`` exceeds it."""
    if value < low:
        raise InvalidFieldError(f"{value} is below {low}", field=name)
    if value > limit:
        raise LimitExceededError(f"{value} exceeds the limit {limit}", field=name)


def check_entry(i: int, e: Entry, limits: PacketLimits) -> tuple[int, int]:
    """Range-check one table entry; return ``(value count, values byte length)``."""
    f = f"layer[{i}]"
    kind = enum_value(RecordKind, e.kind, f"{f}.kind")
    fmt = enum_value(ValueFormat, e.fmt, f"{f}.format")
    rule = rule_of(kind)
    check_range(e.rows, 1, limits.max_rows, f"{f}.rows")
    check_range(e.cols, 1, limits.max_cols, f"{f}.cols")
    if not (math.isfinite(e.epsilon) and e.epsilon >= 0):
        raise InvalidFieldError(f"{e.epsilon} is not finite and >= 0", field=f"{f}.epsilon")
    if not rule.uses_epsilon and e.epsilon != 0:
        raise InvalidFieldError(f"{kind.name} has no perturbed basis: epsilon must be 0",
                                field=f"{f}.epsilon")
    if not rule.uses_variant and e.variant != 0:
        raise InvalidFieldError(f"{kind.name} has no basis variant: variant must be 0",
                                field=f"{f}.variant")
    if rule.positions:
        if e.rank != 0:
            raise InvalidFieldError(f"{kind.name} must have rank 0", field=f"{f}.rank")
        check_range(e.position_count, 0, limits.max_positions_per_layer, f"{f}.position_count")
        if e.rows * e.cols > 2**32 or e.position_count > e.rows * e.cols:
            raise InvalidFieldError("more positions than core cells (or core above 2**32)",
                                    field=f"{f}.position_count")
        low, high = e.position_count, bitpack.MAX_VARINT_BYTES * e.position_count
        if not low <= e.positions_bytes <= high:
            raise InvalidFieldError(f"{e.positions_bytes} not in {low}..{high}",
                                    field=f"{f}.positions_bytes")
    else:
        if e.position_count or e.positions_bytes:
            raise InvalidFieldError(f"{kind.name} carries no positions", field=f"{f}.positions")
        if rule.has_rank:
            check_range(e.rank, 1, limits.max_rank, f"{f}.rank")
        elif e.rank != 0:
            raise InvalidFieldError(f"{kind.name} has no rank: it must be 0", field=f"{f}.rank")
        if rule.rank_within_shape and e.rank > min(e.rows, e.cols):
            raise InvalidFieldError(f"rank {e.rank} > min(rows, cols)", field=f"{f}.rank")
        if rule.dims == "rows" and e.cols != 1:
            raise InvalidFieldError(f"{kind.name} is a vector: cols must be 1",
                                    field=f"{f}.cols")
    count = rule.count(e.rows, e.cols, e.rank, e.position_count)
    check_range(count, 0, limits.max_values_per_layer, f"{f}.value_count")
    if fmt.is_integer:
        check_range(e.group_size, 1, MAX_GROUP_SIZE, f"{f}.group_size")
    elif e.group_size:
        raise InvalidFieldError("float formats have group_size 0", field=f"{f}.group_size")
    return count, values_nbytes(fmt, count, e.group_size)


def record_key(layer_id: int, kind: int) -> tuple[int, int]:
    """Records are ordered, and unique, by ``(layer id, kind)``."""
    return layer_id, kind


def check_head_records(metadata: dict[str, Any], kinds_ids_shapes: list[tuple[int, int, int,
                                                                            int]]) -> None:
    """HEAD_TENSOR records are exactly the tensors ``metadata["head"]["tensors"]`` declares,
    each with that many values (``rows * cols``)."""
    heads = [(lid, rows, cols) for kind, lid, rows, cols in kinds_ids_shapes
             if kind == RecordKind.HEAD_TENSOR]
    declared = metadata.get("head", {}).get("tensors", []) if heads or "head" in metadata \
        else []
    if len(heads) != len(declared) or sorted(lid for lid, _, _ in heads) != list(
            range(len(declared))):
        raise InvalidFieldError(f"{len(heads)} HEAD_TENSOR records for {len(declared)} declared "
                                "head tensors (ids must be 0..n-1)", field="layer_table")
    for lid, rows, cols in heads:
        want = math.prod(declared[lid]["shape"])
        if rows * cols != want:
            raise InvalidFieldError(f"head tensor {lid} has {rows}x{cols} values, metadata "
                                    f"declares shape {declared[lid]['shape']}",
                                    field=f"head.tensors[{lid}]")


def check_projection_size(kinds_shapes: list[tuple[int, int, int, int]],
                          limits: PacketLimits) -> None:
    """The shared projections that ``(kind, rank, rows, cols)`` records make a device
    regenerate (``rank * (max rows + max cols)`` values per kind) stay within the limit:
    checked from the table alone, before a bundle, an allocation or a PRNG is involved."""
    for kind in {k for k, _, _, _ in kinds_shapes if rule_of(RecordKind(k)).shared_projections}:
        shapes = [(rank, rows, cols) for k, rank, rows, cols in kinds_shapes if k == kind]
        size = max(r for r, _, _ in shapes) * (max(rows for _, rows, _ in shapes) +
                                              max(cols for _, _, cols in shapes))
        check_range(size, 0, limits.max_projection_values,
                    f"{RecordKind(kind).name}.projection_values")


def check_shared_projections(kinds_ranks_variants: list[tuple[int, int, int]]) -> None:
    """Records of a kind with shared projections (VeRA) agree on one rank and one key."""
    shared = {(kind, rank, variant) for kind, rank, variant in kinds_ranks_variants
              if rule_of(RecordKind(kind)).shared_projections}
    if len({kind for kind, _, _ in shared}) != len(shared):
        raise InvalidFieldError(f"records disagree on (rank, key): "
                                f"{sorted((r, v) for _, r, v in shared)}", field="layer_table")
