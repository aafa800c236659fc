"""Packet v1 writer: :class:`~solar_edge.format.packet.PacketHeader` + records -> signed bytes.

Deterministic for given inputs (records sorted by layer id, canonical metadata, fixed zstd
parameters). Every check of the reader is applied first, so nothing written is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zstandard

from solar_edge.errors import InvalidFieldError
from solar_edge.format import bitpack, signing
from solar_edge.format.layout import (
    ENTRY,
    FLAG_ZSTD,
    FORMAT_VERSION,
    MAGIC,
    MAX_LAYER_ID,
    U8,
    U16,
    U32,
    U64,
    ZSTD_MAX_WINDOW_LOG,
)
from solar_edge.format.metadata import canonical_metadata
from solar_edge.format.packet import (
    MAX_METADATA_BYTES,
    Entry,
    PacketHeader,
    PacketLimits,
    check_entry,
    check_head_records,
    check_header,
    check_projection_size,
    check_range,
    check_shared_projections,
    record_key,
)
from solar_edge.format.records import CodecHeader, LayerRecord, QuantizedValues, ValueFormat

ZSTD_LEVEL = 19


def _encode_values(f: str, qv: QuantizedValues, count: int) -> bytes:
    if qv.count != count:
        raise InvalidFieldError(f"count {qv.count} != expected {count}", field=f"{f}.values")
    if not qv.fmt.is_integer:
        dtype = "<f4" if qv.fmt == ValueFormat.FLOAT32 else "<f2"
        raw = np.asarray(qv.raw).reshape(-1).astype(dtype)
        if raw.size != count or not np.all(np.isfinite(raw)):
            raise InvalidFieldError("raw values must be `count` finite floats", field=f"{f}.values")
        return raw.tobytes()
    n_groups = -(-count // qv.group_size)
    scales = np.asarray(qv.scales).reshape(-1).astype("<f2")
    if scales.size != n_groups or not np.all(np.isfinite(scales) & (scales >= 0)):
        raise InvalidFieldError(f"need {n_groups} finite scales >= 0", field=f"{f}.scales")
    codes = np.asarray(qv.codes).reshape(-1)
    q = (1 << (qv.fmt.bits - 1)) - 1
    if codes.size != count or (count and int(np.abs(codes.astype(np.int16)).max()) > q):
        raise InvalidFieldError(f"need {count} codes within +-{q}", field=f"{f}.codes")
    return scales.tobytes() + bitpack.pack_codes(codes, qv.fmt.bits)


def _encode_record(i: int, rec: LayerRecord, limits: PacketLimits) -> tuple[bytes, bytes]:
    f = f"layer[{i}]"
    if not 0 <= rec.layer_id <= MAX_LAYER_ID:
        raise InvalidFieldError(f"{rec.layer_id} not in 0..{MAX_LAYER_ID}", field=f"{f}.layer_id")
    if not 0 <= rec.variant <= 0xFFFF or not 0 <= rec.rank <= 0xFFFF:
        raise InvalidFieldError("variant and rank must fit in u16", field=f)
    positions = np.asarray(rec.positions).reshape(-1)
    pos_bytes = b""
    if positions.size:
        p = positions.astype(np.int64)
        if p[0] < 0 or np.any(np.diff(p) <= 0) or p[-1] >= rec.rows * rec.cols:
            raise InvalidFieldError("must be strictly increasing and < rows*cols",
                                    field=f"{f}.positions")
        pos_bytes = bitpack.encode_positions(p)
    epsilon = float(np.float32(rec.epsilon))
    entry = Entry(rec.layer_id, int(rec.kind), int(rec.values.fmt), rec.variant, rec.rank,
                  rec.rows, rec.cols, epsilon, positions.size, len(pos_bytes),
                  rec.values.group_size if rec.values.fmt.is_integer else 0)
    count, _ = check_entry(i, entry, limits)
    return ENTRY.pack(*entry), pos_bytes + _encode_values(f, rec.values, count)


def _compress(raw: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, source_size=len(raw), write_content_size=0, write_checksum=0, write_dict_id=0
    )
    if params.window_log > ZSTD_MAX_WINDOW_LOG:
        params = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL, source_size=len(raw), window_log=ZSTD_MAX_WINDOW_LOG,
            write_content_size=0, write_checksum=0, write_dict_id=0,
        )
    frame = zstandard.ZstdCompressor(compression_params=params).compress(raw)
    return U32.pack(len(raw)) + frame


def encode_packet(
    header: PacketHeader,
    codec: CodecHeader,
    records: Sequence[LayerRecord],
    signing_key: signing.Ed25519PrivateKey,
    *,
    compress: bool | None = None,
    limits: PacketLimits = PacketLimits(),  # noqa: B008 (frozen, immutable default)
) -> bytes:
    """Serialise and sign. Records are written sorted by layer id (ids must be unique).

    ``compress``: None compresses the body with zstd only when that makes the packet smaller.
    """
    check_header(header, codec)
    metadata = canonical_metadata(header.metadata)
    check_range(len(metadata), 2, min(limits.max_metadata_bytes, MAX_METADATA_BYTES),
                "header.metadata")
    ordered = sorted(records, key=lambda r: record_key(r.layer_id, int(r.kind)))
    check_range(len(ordered), 0, min(limits.max_layers, 0xFFFF), "header.layer_count")
    table, payload, values = [], [], 0
    for i, rec in enumerate(ordered):
        prev = ordered[i - 1] if i else None
        if prev is not None and (prev.layer_id, prev.kind) == (rec.layer_id, rec.kind):
            raise InvalidFieldError(f"duplicate record {rec.kind.name} for layer {rec.layer_id}",
                                    field=f"layer[{i}]")
        entry, data = _encode_record(i, rec, limits)
        table.append(entry)
        payload.append(data)
        values += rec.values.count
    check_range(values, 0, limits.max_values_per_packet, "layer_table.value_count")
    check_shared_projections([(int(r.kind), r.rank, r.variant) for r in ordered])
    check_projection_size([(int(r.kind), r.rank, r.rows, r.cols) for r in ordered], limits)
    check_head_records(header.metadata, [(int(r.kind), r.layer_id, r.rows, r.cols)
                                         for r in ordered])
    body = b"".join(table) + b"".join(payload)
    flags = 0
    if compress or compress is None:
        packed = _compress(body)
        if compress or len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD
    adapter_id = header.adapter_id.encode("ascii")
    head = b"".join([
        MAGIC, U16.pack(FORMAT_VERSION), U16.pack(flags), header.fingerprint,
        U8.pack(len(adapter_id)), adapter_id, U64.pack(header.adapter_version),
        U8.pack(int(codec.prng)), U8.pack(int(codec.perturbation)), U64.pack(codec.seed),
        U16.pack(len(metadata)), metadata, U16.pack(len(ordered)), U32.pack(len(body)),
    ])
    signed = head + body + signing.key_id(signing_key)
    out = signed + signing.sign(signing_key, signed)
    check_range(len(out), 0, limits.max_packet_bytes, "packet")
    return out
