"""Packet v1 reader: hostile bytes -> a checked :class:`~solar_edge.format.packet.Packet`.

Reading happens in a fixed order: total length cap -> header fields one by one (each
range-checked as read; adapter version 1..2**64-2; metadata by
:mod:`~solar_edge.format.metadata`) -> declared body length against the bytes present ->
signature (when trusted keys are given, before the body is touched) -> optional zstd with
a capped output, its layer table checked as soon as it is out -> layer table (caps, ranges,
value totals, payload sizes with exact integer arithmetic, the size of the shared
projections a device would regenerate) -> payload decode -> semantic checks. Nothing is
allocated in proportion to a declared count before that count has been checked against the
limits and the bytes actually present.
Every failure is a :class:`~solar_edge.errors.PacketError` subclass naming the field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import zstandard

from solar_edge.errors import (
    BadMagicError,
    InvalidFieldError,
    PacketError,
    SignatureError,
    TrailingDataError,
    TruncatedPacketError,
    UnsupportedVersionError,
)
from solar_edge.format import bitpack, signing
from solar_edge.format.layout import (
    ENTRY,
    FINGERPRINT_BYTES,
    FLAG_ZSTD,
    FORMAT_VERSION,
    KNOWN_FLAGS,
    LAYER_ENTRY_BYTES,
    MAGIC,
    U8,
    U16,
    U32,
    U64,
    ZSTD_MAX_WINDOW_LOG,
)
from solar_edge.format.metadata import parse_metadata
from solar_edge.format.packet import (
    MAX_METADATA_BYTES,
    Entry,
    Packet,
    PacketHeader,
    PacketLimits,
    check_adapter_id,
    check_adapter_version,
    check_entry,
    check_head_records,
    check_projection_size,
    check_range,
    check_shared_projections,
    enum_value,
    record_key,
)
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    PrngKind,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)


class _Reader:
    """Bounds-checked cursor: every read names its field and raises on truncation."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, name: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise TruncatedPacketError(
                f"needs {n} bytes at offset {self.pos}, only {len(self.data) - self.pos} left",
                field=name,
            )
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def unpack(self, st: struct.Struct, name: str) -> int:
        return int(st.unpack(self.take(st.size, name))[0])


def _read_header(r: _Reader, limits: PacketLimits) -> tuple[PacketHeader, CodecHeader, int, int]:
    """Header fields in order; returns (header, codec, flags, layer count); leaves r at body."""
    if r.take(len(MAGIC), "header.magic") != MAGIC:
        raise BadMagicError(f"expected {MAGIC!r}", field="header.magic")
    version = r.unpack(U16, "header.version")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"version {version}, reader implements {FORMAT_VERSION}",
                                      field="header.version")
    flags = r.unpack(U16, "header.flags")
    if flags & ~KNOWN_FLAGS:
        raise InvalidFieldError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#06x}",
                                field="header.flags")
    fingerprint = r.take(FINGERPRINT_BYTES, "header.fingerprint")
    adapter_id = check_adapter_id(r.take(r.unpack(U8, "header.adapter_id"), "header.adapter_id"))
    adapter_version = check_adapter_version(r.unpack(U64, "header.adapter_version"))
    prng = enum_value(PrngKind, r.unpack(U8, "codec.prng"), "codec.prng")
    perturbation = enum_value(PerturbationKind, r.unpack(U8, "codec.perturbation"),
                              "codec.perturbation")
    seed = r.unpack(U64, "codec.seed")
    meta_len = r.unpack(U16, "header.metadata")
    check_range(meta_len, 2, min(limits.max_metadata_bytes, MAX_METADATA_BYTES),
                "header.metadata")
    metadata = parse_metadata(r.take(meta_len, "header.metadata"))
    layer_count = r.unpack(U16, "header.layer_count")
    check_range(layer_count, 0, limits.max_layers, "header.layer_count")
    header = PacketHeader(fingerprint, adapter_id, adapter_version, metadata)
    return header, CodecHeader(seed, prng, perturbation), flags, layer_count


def _verify(signed: bytes, kid: bytes, signature: bytes, trusted: signing.TrustedKeys) -> None:
    key = signing.keyring(trusted).get(kid)
    if key is None:
        raise SignatureError(f"key id {kid.hex()} is not trusted", field="key_id")
    signing.verify(key, signature, signed)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_CHUNK = 1 << 16


def _zstd_frame_size(frame: bytes) -> int:
    """Length of the zstd frame that starts ``frame``, from its header and block headers
    alone (RFC 8878, 3.1.1), without decoding anything; ValueError if it is incomplete."""
    if frame[:4] != _ZSTD_MAGIC or len(frame) < 5:
        raise ValueError("not a zstd frame")
    fhd = frame[4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    if fhd & 0x08:
        raise ValueError("reserved frame header bit set")
    pos = 5 + (1 - single) + (0, 1, 2, 4)[dict_flag] + (single, 2, 4, 8)[fcs_flag]
    while True:
        if pos + 3 > len(frame):
            raise ValueError("frame ends inside a block header")
        block = int.from_bytes(frame[pos : pos + 3], "little")
        kind, size = (block >> 1) & 3, block >> 3
        if kind == 3:
            raise ValueError("reserved block type")
        pos += 3 + (1 if kind == 1 else size)  # RLE blocks carry one byte
        if block & 1:  # last block
            break
    pos += 4 * checksum
    if pos > len(frame):
        raise ValueError("frame is incomplete")
    return pos


def _decompress(body: bytes, layer_count: int, limits: PacketLimits,
                check_table: Callable[[bytes], object]) -> bytes:
    """The zstd body, decoded once with capped reads; ``check_table`` sees the layer table
    as soon as it is decoded, so declared sizes above the limits stop before the payload
    is decoded. One frame exactly: its extent is read from its block headers first."""
    r = _Reader(body)
    raw_len = r.unpack(U32, "body.raw_length")
    check_range(raw_len, 0, limits.max_body_bytes, "body.raw_length")
    table_len = layer_count * LAYER_ENTRY_BYTES
    if raw_len < table_len:
        raise TruncatedPacketError(f"raw body of {raw_len} bytes cannot hold {layer_count} "
                                   "table entries", field="layer_table")
    frame = body[r.pos :]
    try:
        if _zstd_frame_size(frame) != len(frame):
            raise InvalidFieldError("zstd frame followed by data", field="body")
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << ZSTD_MAX_WINDOW_LOG)
        reader = dctx.stream_reader(frame, read_across_frames=False)
        table = reader.read(table_len) if table_len else b""
        if len(table) == table_len:
            check_table(table)
        out = bytearray(table)
        while len(out) <= raw_len:  # grow with real output, never by the declared length
            chunk = reader.read(min(_READ_CHUNK, raw_len + 1 - len(out)))
            if not chunk:
                break
            out += chunk
    except (zstandard.ZstdError, ValueError) as exc:  # PacketError is neither
        raise InvalidFieldError(f"zstd: {exc}", field="body") from exc
    if len(out) != raw_len:
        raise InvalidFieldError(f"decompresses to {len(out)} bytes, declared {raw_len}"
                                f"{' or more' if len(out) > raw_len else ''}", field="body")
    return bytes(out)


def _read_values(r: _Reader, f: str, fmt: ValueFormat, count: int, group: int) -> QuantizedValues:
    if not fmt.is_integer:
        dtype = "<f4" if fmt == ValueFormat.FLOAT32 else "<f2"
        raw = np.frombuffer(r.take(count * fmt.bits // 8, f"{f}.values"), dtype)
        if not np.all(np.isfinite(raw)):
            raise InvalidFieldError("non-finite value", field=f"{f}.values")
        return QuantizedValues(fmt, count, raw=raw.astype(raw.dtype.newbyteorder("=")))
    scales = np.frombuffer(r.take(2 * (-(-count // group)), f"{f}.scales"), "<f2")
    if not np.all(np.isfinite(scales) & (scales >= 0)):
        raise InvalidFieldError("scales must be finite and >= 0", field=f"{f}.scales")
    try:
        codes = bitpack.unpack_codes(r.take(bitpack.codes_nbytes(count, fmt.bits), f"{f}.codes"),
                                     fmt.bits, count)
    except ValueError as exc:
        raise InvalidFieldError(str(exc), field=f"{f}.codes") from exc
    return QuantizedValues(fmt, count, group, codes=codes, scales=scales.astype(np.float16))


def _read_table(table: bytes, limits: PacketLimits,
                metadata: dict) -> tuple[list[tuple[Entry, int]], int]:
    """Every check of the layer table alone; returns the entries with their value counts,
    and the payload bytes they declare."""
    entries: list[tuple[Entry, int]] = []
    payload = total = 0
    for i, fields in enumerate(ENTRY.iter_unpack(table)):
        e = Entry(*fields)
        prev = entries[-1][0] if entries else None
        if prev is not None and record_key(e.layer_id, e.kind) <= record_key(prev.layer_id,
                                                                             prev.kind):
            raise InvalidFieldError("(layer id, kind) must be strictly increasing",
                                    field=f"layer[{i}].layer_id")
        count, nbytes = check_entry(i, e, limits)
        entries.append((e, count))
        payload += e.positions_bytes + nbytes
        total += count
    check_range(total, 0, limits.max_values_per_packet, "layer_table.value_count")
    check_shared_projections([(e.kind, e.rank, e.variant) for e, _ in entries])
    check_projection_size([(e.kind, e.rank, e.rows, e.cols) for e, _ in entries], limits)
    check_head_records(metadata, [(e.kind, e.layer_id, e.rows, e.cols) for e, _ in entries])
    return entries, payload


def _read_body(raw: bytes, layer_count: int, limits: PacketLimits, metadata: dict,
               checked: tuple[list[tuple[Entry, int]], int] | None = None) -> list[LayerRecord]:
    """``checked``: what :func:`_read_table` returned for this body's table (zstd bodies
    check it while decompressing), so the table is checked once."""
    r = _Reader(raw)
    table = r.take(layer_count * LAYER_ENTRY_BYTES, "layer_table")
    entries, payload = checked or _read_table(table, limits, metadata)
    left = len(raw) - r.pos
    if payload > left:
        raise TruncatedPacketError(f"layers declare {payload} payload bytes, {left} present",
                                   field="body")
    if payload < left:
        raise TrailingDataError(f"{left - payload} bytes after the last layer", field="body")
    records = []
    for i, (e, count) in enumerate(entries):
        f = f"layer[{i}]"
        try:
            positions = bitpack.decode_positions(r.take(e.positions_bytes, f"{f}.positions"),
                                                 e.position_count)
        except ValueError as exc:
            raise InvalidFieldError(str(exc), field=f"{f}.positions") from exc
        if positions.size and int(positions[-1]) >= e.rows * e.cols:
            raise InvalidFieldError(f"index {int(positions[-1])} >= rows*cols",
                                    field=f"{f}.positions")
        values = _read_values(r, f, ValueFormat(e.fmt), count, e.group_size)
        records.append(LayerRecord(
            layer_id=e.layer_id, kind=RecordKind(e.kind), rows=e.rows, cols=e.cols,
            rank=e.rank, values=values, positions=positions.astype(np.uint32),
            variant=e.variant, epsilon=e.epsilon,
        ))
    return records


def decode_packet(
    data: bytes,
    trusted_keys: signing.TrustedKeys | None = None,
    limits: PacketLimits = PacketLimits(),  # noqa: B008 (frozen, immutable default)
) -> Packet:
    """Parse and check a packet; verify its signature when ``trusted_keys`` is given.

    ``trusted_keys`` is a mapping ``{key id: public key}`` or an iterable of public keys; the
    key is chosen by the packet's key id and an unknown id raises :class:`SignatureError`.
    With ``None`` the signature is not checked (inspection only: never apply such a packet).
    """
    try:
        data = memoryview(data).tobytes()  # not bytes(data): bytes(2**40) would allocate
    except TypeError as exc:
        raise PacketError("packet must be bytes-like", field="packet") from exc
    check_range(len(data), 0, limits.max_packet_bytes, "packet")
    r = _Reader(data)
    header, codec, flags, layer_count = _read_header(r, limits)
    body_len = r.unpack(U32, "header.body_length")
    body = r.take(body_len, "body")
    kid = r.take(signing.KEY_ID_BYTES, "key_id")
    signature = r.take(signing.SIGNATURE_BYTES, "signature")
    if r.pos != len(data):
        raise TrailingDataError(f"{len(data) - r.pos} bytes after the signature", field="packet")
    if trusted_keys is not None:
        _verify(data[: -signing.SIGNATURE_BYTES], kid, signature, trusted_keys)
    checked: list[tuple[list[tuple[Entry, int]], int]] = []  # the table, checked once
    raw = _decompress(body, layer_count, limits,
                      lambda table: checked.append(_read_table(table, limits, header.metadata))) \
        if flags & FLAG_ZSTD else body
    records = _read_body(raw, layer_count, limits, header.metadata,
                         checked[0] if checked else None)
    return Packet(header, codec, records, kid, signature, compressed=bool(flags & FLAG_ZSTD))
