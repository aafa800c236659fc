"""Packet v1 byte layout: field structs, fixed sizes, and the byte size of every part.

This module is the one place each size formula lives; the writer, the reader, the
encoders' byte budgets and ``solar-edge inspect`` all use it (spec: docs/packet-format.md).

* header: ``67 + len(adapter id) + len(canonical metadata)`` bytes; trailer: key id (8) +
  Ed25519 signature (64);
* a layer-table entry: 30 bytes;
* positions: LEB128 varints of the deltas of strictly increasing flat indices (first delta =
  first index);
* values: FLOAT32 ``4 * count``, FLOAT16 ``2 * count``; integer formats of ``b`` bits: one
  float16 scale per ``group_size`` values (``2 * ceil(count / group_size)``) then the codes
  bit-packed LSB-first as offset-binary (``ceil(count * b / 8)``).

An uncompressed packet is exactly ``fixed_overhead_bytes + sum(record_nbytes)``; with zstd
that is an upper bound.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from solar_edge.format import bitpack, signing
from solar_edge.format.metadata import canonical_metadata
from solar_edge.format.records import LayerRecord, ValueFormat

if TYPE_CHECKING:
    from solar_edge.format.packet import PacketHeader

MAGIC = b"SLRP"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x0001
KNOWN_FLAGS = FLAG_ZSTD
FINGERPRINT_BYTES = 32
MAX_GROUP_SIZE = 0xFFFF
MAX_LAYER_ID = 0xFFFF
HEADER_FIXED_BYTES = 67  # header without the adapter id and metadata bytes
ZSTD_MAX_WINDOW_LOG = 23  # writers never exceed it; readers refuse larger windows
TRAILER_BYTES = signing.KEY_ID_BYTES + signing.SIGNATURE_BYTES  # key id + signature = 72

DEFAULT_PACKET_OVERHEAD = 256
"""Bytes an encoder reserves for header, metadata and trailer when the caller gives none
(the exact figure is :func:`fixed_overhead_bytes` of the adapter id and metadata)."""

# layer id, kind, format, variant, rank, rows, cols, epsilon, position count,
# positions byte length, group size
ENTRY = struct.Struct("<HBBHHIIfIIH")
LAYER_ENTRY_BYTES = ENTRY.size  # 30
U8, U16, U32, U64 = (struct.Struct(f"<{c}") for c in "BHIQ")


def values_nbytes(fmt: ValueFormat, count: int, group_size: int = 0) -> int:
    """Payload bytes of ``count`` values: raw floats, or float16 group scales + packed codes."""
    fmt = ValueFormat(fmt)
    if not fmt.is_integer:
        return count * fmt.bits // 8
    if group_size < 1:
        raise ValueError("integer formats need group_size >= 1")
    return 2 * (-(-count // group_size)) + bitpack.codes_nbytes(count, fmt.bits)


def positions_nbytes(positions: np.ndarray) -> int:
    """Bytes of the LEB128 delta varints of strictly increasing positions."""
    return int(bitpack.varint_sizes(bitpack.position_deltas(positions)).sum())


def record_nbytes(record: LayerRecord) -> int:
    """Layer-table entry + positions + values of one record."""
    qv = record.values
    return (LAYER_ENTRY_BYTES + positions_nbytes(record.positions)
            + values_nbytes(qv.fmt, qv.count, qv.group_size))


def header_nbytes(adapter_id: str, metadata: dict[str, Any]) -> int:
    return HEADER_FIXED_BYTES + len(adapter_id.encode("utf-8")) + len(canonical_metadata(metadata))


def fixed_overhead_bytes(adapter_id: str, metadata: dict[str, Any]) -> int:
    """Header plus trailer: ``139 + len(adapter_id) + len(canonical metadata)`` bytes."""
    return header_nbytes(adapter_id, metadata) + TRAILER_BYTES


def packet_nbytes(header: PacketHeader, records: Sequence[LayerRecord]) -> int:
    """Exact size without compression (an upper bound when compression is automatic)."""
    return fixed_overhead_bytes(header.adapter_id, header.metadata) + sum(
        record_nbytes(r) for r in records
    )
