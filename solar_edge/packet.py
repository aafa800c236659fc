"""Packet format v1: signed, versioned bytes <-> :class:`Packet` (spec: docs/packet-format.md).

Reading is done for hostile input, in a fixed order: total length cap -> header fields one
by one (each range-checked as read) -> declared body length against the bytes present ->
signature (when trusted keys are given, before the body is touched) -> optional zstd with a
capped output -> layer table (caps, ranges, payload sizes with exact integer arithmetic) ->
payload decode -> semantic checks. Nothing is allocated in proportion to a declared count
before that count has been checked against the limits and the bytes actually present.
Every failure is a :class:`~solar_edge.errors.PacketError` subclass naming the field.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import zstandard

from solar_edge import bitpack, signing
from solar_edge.errors import (
    BadMagicError,
    InvalidFieldError,
    LimitExceededError,
    PacketError,
    SignatureError,
    TrailingDataError,
    TruncatedPacketError,
    UnsupportedVersionError,
)
from solar_edge.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    PrngKind,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)

MAGIC = b"SLRP"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x0001
KNOWN_FLAGS = FLAG_ZSTD
FINGERPRINT_BYTES = 32
MAX_ADAPTER_ID_BYTES = 64
MAX_METADATA_BYTES = 4096
MAX_GROUP_SIZE = 0xFFFF
MAX_LAYER_ID = 0xFFFF
HEADER_FIXED_BYTES = 67  # header without the adapter id and metadata bytes
TRAILER_BYTES = signing.KEY_ID_BYTES + signing.SIGNATURE_BYTES  # key id + signature = 72
ZSTD_LEVEL = 19
ZSTD_MAX_WINDOW_LOG = 23  # writers never exceed it; readers refuse larger windows
_READ_CHUNK = 1 << 16

# layer id, kind, format, variant, rank, rows, cols, epsilon, position count,
# positions byte length, group size
_ENTRY = struct.Struct("<HBBHHIIfIIH")
LAYER_ENTRY_BYTES = _ENTRY.size  # 30
_U8, _U16, _U32, _U64 = (struct.Struct(f"<{c}") for c in "BHIQ")
_ADAPTER_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PacketLimits:
    """Every limit a reader enforces, in one place (a device profile may lower them)."""

    max_packet_bytes: int = 16 * 2**20
    max_body_bytes: int = 64 * 2**20  # after decompression
    max_layers: int = 4096
    max_values_per_layer: int = 2**24
    max_positions_per_layer: int = 2**22
    max_rows: int = 2**16
    max_cols: int = 2**16
    max_rank: int = 4096
    max_metadata_bytes: int = MAX_METADATA_BYTES


@dataclass(frozen=True)
class PacketHeader:
    """Who the packet is for and what it is: base bundle, adapter identity, metadata."""

    fingerprint: bytes  # SHA-256 of the base bundle manifest
    adapter_id: str  # 1..64 of [A-Za-z0-9._-], not starting with '.' or '-'
    adapter_version: int  # u64, monotonic per adapter id (anti-rollback)
    metadata: dict[str, Any] = field(default_factory=dict)  # task name, labels, head seed


@dataclass(frozen=True)
class Packet:
    header: PacketHeader
    codec: CodecHeader
    records: list[LayerRecord]
    key_id: bytes
    signature: bytes
    compressed: bool = False


class _Entry(NamedTuple):
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


# --- sizes (exact for uncompressed packets; the codec budgets with these) ---------------

def canonical_metadata(metadata: dict[str, Any]) -> bytes:
    """The only accepted metadata bytes: sorted keys, no spaces, UTF-8, no NaN/Infinity."""
    try:
        text = json.dumps(
            metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidFieldError(f"not JSON-serialisable: {exc}", field="header.metadata") from exc
    return text.encode("utf-8")


def header_nbytes(adapter_id: str, metadata: dict[str, Any]) -> int:
    return HEADER_FIXED_BYTES + len(adapter_id.encode("utf-8")) + len(canonical_metadata(metadata))


def fixed_overhead_bytes(adapter_id: str, metadata: dict[str, Any]) -> int:
    """Header plus trailer: ``139 + len(adapter_id) + len(canonical metadata)`` bytes."""
    return header_nbytes(adapter_id, metadata) + TRAILER_BYTES


def values_nbytes(fmt: ValueFormat, count: int, group_size: int = 0) -> int:
    """Payload bytes of ``count`` values: raw floats, or f16 group scales + packed codes."""
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
    """Layer table entry + positions + values of one record."""
    qv = record.values
    return (LAYER_ENTRY_BYTES + positions_nbytes(record.positions)
            + values_nbytes(qv.fmt, qv.count, qv.group_size))


def packet_nbytes(header: PacketHeader, records: Sequence[LayerRecord]) -> int:
    """Exact size without compression (an upper bound when compression is automatic)."""
    return fixed_overhead_bytes(header.adapter_id, header.metadata) + sum(
        record_nbytes(r) for r in records
    )


# --- shared checks ------------------------------------------------------------------------

def _check_adapter_id(raw: bytes) -> str:
    if not 1 <= len(raw) <= MAX_ADAPTER_ID_BYTES:
        raise InvalidFieldError(f"length {len(raw)} not in 1..64", field="header.adapter_id")
    text = raw.decode("ascii", errors="replace")
    if not _ADAPTER_ID.fullmatch(text):
        raise InvalidFieldError(
            f"{text!r} must match [A-Za-z0-9_][A-Za-z0-9._-]*", field="header.adapter_id"
        )
    return text


def _check_header(header: PacketHeader, codec: CodecHeader) -> None:
    if not isinstance(header.fingerprint, bytes) or len(header.fingerprint) != FINGERPRINT_BYTES:
        raise InvalidFieldError("must be 32 bytes", field="header.fingerprint")
    _check_adapter_id(header.adapter_id.encode("utf-8"))
    if not 0 <= header.adapter_version < 2**64:
        raise InvalidFieldError("must fit in u64", field="header.adapter_version")
    if not isinstance(header.metadata, dict):
        raise InvalidFieldError("must be a JSON object (dict)", field="header.metadata")
    if not 0 <= codec.seed < 2**64:
        raise InvalidFieldError("must fit in u64", field="codec.seed")
    _enum(PrngKind, int(codec.prng), "codec.prng")
    _enum(PerturbationKind, int(codec.perturbation), "codec.perturbation")


def _enum(cls: type, value: int, name: str) -> Any:
    try:
        return cls(value)
    except ValueError as exc:
        raise InvalidFieldError(f"unknown value {value}", field=name) from exc


def _range(value: int, low: int, limit: int, name: str) -> None:
    """``value`` below ``low`` is invalid; above the reader's ``limit`` exceeds it."""
    if value < low:
        raise InvalidFieldError(f"{value} is below {low}", field=name)
    if value > limit:
        raise LimitExceededError(f"{value} exceeds the limit {limit}", field=name)


def _check_entry(i: int, e: _Entry, limits: PacketLimits) -> tuple[int, int]:
    """Range-check one table entry; return ``(value count, values byte length)``."""
    f = f"layer[{i}]"
    kind = _enum(RecordKind, e.kind, f"{f}.kind")
    fmt = _enum(ValueFormat, e.fmt, f"{f}.format")
    _range(e.rows, 1, limits.max_rows, f"{f}.rows")
    _range(e.cols, 1, limits.max_cols, f"{f}.cols")
    if not (math.isfinite(e.epsilon) and e.epsilon >= 0):
        raise InvalidFieldError(f"{e.epsilon} is not finite and >= 0", field=f"{f}.epsilon")
    if kind in (RecordKind.DENSE_FACTORS, RecordKind.VERA_SCALES) and e.epsilon != 0:
        raise InvalidFieldError(f"{kind.name} has no perturbed basis: epsilon must be 0",
                                field=f"{f}.epsilon")
    if kind == RecordKind.DENSE_FACTORS and e.variant != 0:
        raise InvalidFieldError("DENSE_FACTORS has no basis: variant must be 0",
                                field=f"{f}.variant")
    if kind == RecordKind.SPARSE_CORE:
        if e.rank != 0:
            raise InvalidFieldError("SPARSE_CORE must have rank 0", field=f"{f}.rank")
        _range(e.position_count, 0, limits.max_positions_per_layer, f"{f}.position_count")
        if e.rows * e.cols > 2**32 or e.position_count > e.rows * e.cols:
            raise InvalidFieldError("more positions than core cells (or core above 2**32)",
                                    field=f"{f}.position_count")
        low, high = e.position_count, bitpack.MAX_VARINT_BYTES * e.position_count
        if not low <= e.positions_bytes <= high:
            raise InvalidFieldError(f"{e.positions_bytes} not in {low}..{high}",
                                    field=f"{f}.positions_bytes")
        count = e.position_count
    else:
        if e.position_count or e.positions_bytes:
            raise InvalidFieldError(f"{kind.name} carries no positions", field=f"{f}.positions")
        _range(e.rank, 1, limits.max_rank, f"{f}.rank")
        if kind == RecordKind.VERA_SCALES:
            count = e.rows + e.rank
        elif e.rank > min(e.rows, e.cols):
            raise InvalidFieldError(f"rank {e.rank} > min(rows, cols)", field=f"{f}.rank")
        else:
            count = (e.rows + e.cols) * e.rank
    _range(count, 0, limits.max_values_per_layer, f"{f}.value_count")
    if fmt.is_integer:
        _range(e.group_size, 1, MAX_GROUP_SIZE, f"{f}.group_size")
    elif e.group_size:
        raise InvalidFieldError("float formats have group_size 0", field=f"{f}.group_size")
    return count, values_nbytes(fmt, count, e.group_size)


# --- encoding -----------------------------------------------------------------------------

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


def _check_shared_projections(kinds_ranks_variants: list[tuple[int, int, int]]) -> None:
    """VERA_SCALES records share one pair of projections: one rank and one key (variant)."""
    shared = {(rank, variant) for kind, rank, variant in kinds_ranks_variants
              if kind == RecordKind.VERA_SCALES}
    if len(shared) > 1:
        raise InvalidFieldError(f"VERA_SCALES records disagree on (rank, key): {sorted(shared)}",
                                field="layer_table")


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
    entry = _Entry(rec.layer_id, int(rec.kind), int(rec.values.fmt), rec.variant, rec.rank,
                   rec.rows, rec.cols, epsilon, positions.size, len(pos_bytes),
                   rec.values.group_size if rec.values.fmt.is_integer else 0)
    count, _ = _check_entry(i, entry, limits)
    return _ENTRY.pack(*entry), pos_bytes + _encode_values(f, rec.values, count)


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
    return _U32.pack(len(raw)) + frame


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
    The encoder applies the reader's checks, so it never writes a packet the reader rejects.
    """
    _check_header(header, codec)
    metadata = canonical_metadata(header.metadata)
    _range(len(metadata), 2, min(limits.max_metadata_bytes, MAX_METADATA_BYTES),
           "header.metadata")
    ordered = sorted(records, key=lambda r: r.layer_id)
    _range(len(ordered), 0, min(limits.max_layers, 0xFFFF), "header.layer_count")
    table, payload = [], []
    for i, rec in enumerate(ordered):
        if i and rec.layer_id == ordered[i - 1].layer_id:
            raise InvalidFieldError(f"duplicate layer id {rec.layer_id}", field=f"layer[{i}]")
        entry, data = _encode_record(i, rec, limits)
        table.append(entry)
        payload.append(data)
    _check_shared_projections([(int(r.kind), r.rank, r.variant) for r in ordered])
    body = b"".join(table) + b"".join(payload)
    flags = 0
    if compress or compress is None:
        packed = _compress(body)
        if compress or len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD
    adapter_id = header.adapter_id.encode("ascii")
    head = b"".join([
        MAGIC, _U16.pack(FORMAT_VERSION), _U16.pack(flags), header.fingerprint,
        _U8.pack(len(adapter_id)), adapter_id, _U64.pack(header.adapter_version),
        _U8.pack(int(codec.prng)), _U8.pack(int(codec.perturbation)), _U64.pack(codec.seed),
        _U16.pack(len(metadata)), metadata, _U16.pack(len(ordered)), _U32.pack(len(body)),
    ])
    signed = head + body + signing.key_id(signing_key)
    out = signed + signing.sign(signing_key, signed)
    _range(len(out), 0, limits.max_packet_bytes, "packet")
    return out


# --- decoding -----------------------------------------------------------------------------

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


def _parse_metadata(raw: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidFieldError(f"not UTF-8 JSON: {exc}", field="header.metadata") from exc
    if not isinstance(obj, dict):
        raise InvalidFieldError("must be a JSON object", field="header.metadata")
    if canonical_metadata(obj) != raw:
        raise InvalidFieldError("not in canonical form (sorted keys, no spaces, no duplicates)",
                                field="header.metadata")
    return obj


def _read_header(r: _Reader, limits: PacketLimits) -> tuple[PacketHeader, CodecHeader, int, int]:
    """Header fields in order; returns (header, codec, flags, layer count); leaves r at body."""
    if r.take(len(MAGIC), "header.magic") != MAGIC:
        raise BadMagicError(f"expected {MAGIC!r}", field="header.magic")
    version = r.unpack(_U16, "header.version")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"version {version}, reader implements {FORMAT_VERSION}",
                                      field="header.version")
    flags = r.unpack(_U16, "header.flags")
    if flags & ~KNOWN_FLAGS:
        raise InvalidFieldError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#06x}",
                                field="header.flags")
    fingerprint = r.take(FINGERPRINT_BYTES, "header.fingerprint")
    adapter_id = _check_adapter_id(r.take(r.unpack(_U8, "header.adapter_id"), "header.adapter_id"))
    adapter_version = r.unpack(_U64, "header.adapter_version")
    prng = _enum(PrngKind, r.unpack(_U8, "codec.prng"), "codec.prng")
    perturbation = _enum(PerturbationKind, r.unpack(_U8, "codec.perturbation"),
                         "codec.perturbation")
    seed = r.unpack(_U64, "codec.seed")
    meta_len = r.unpack(_U16, "header.metadata")
    _range(meta_len, 2, min(limits.max_metadata_bytes, MAX_METADATA_BYTES), "header.metadata")
    metadata = _parse_metadata(r.take(meta_len, "header.metadata"))
    layer_count = r.unpack(_U16, "header.layer_count")
    _range(layer_count, 0, limits.max_layers, "header.layer_count")
    header = PacketHeader(fingerprint, adapter_id, adapter_version, metadata)
    return header, CodecHeader(seed, prng, perturbation), flags, layer_count


def _verify(signed: bytes, kid: bytes, signature: bytes, trusted: signing.TrustedKeys) -> None:
    key = signing.keyring(trusted).get(kid)
    if key is None:
        raise SignatureError(f"key id {kid.hex()} is not trusted", field="key_id")
    signing.verify(key, signature, signed)


def _decompress(body: bytes, layer_count: int, limits: PacketLimits) -> bytes:
    r = _Reader(body)
    raw_len = r.unpack(_U32, "body.raw_length")
    _range(raw_len, 0, limits.max_body_bytes, "body.raw_length")
    if raw_len < layer_count * LAYER_ENTRY_BYTES:
        raise TruncatedPacketError(f"raw body of {raw_len} bytes cannot hold {layer_count} "
                                   "table entries", field="layer_table")
    frame = body[r.pos :]
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << ZSTD_MAX_WINDOW_LOG)
        reader = dctx.stream_reader(frame, read_across_frames=False)
        out = bytearray()
        while len(out) <= raw_len:  # grow with real output, never by the declared length
            chunk = reader.read(min(_READ_CHUNK, raw_len + 1 - len(out)))
            if not chunk:
                break
            out += chunk
        raw = bytes(out)
        if len(raw) != raw_len:
            raise InvalidFieldError(f"decompresses to {len(raw)} bytes, declared {raw_len}"
                                    f"{' or more' if len(raw) > raw_len else ''}", field="body")
        # the frame is now known to hold exactly raw_len bytes: a full decode is bounded
        dobj = dctx.decompressobj()
        dobj.decompress(frame)
    except (zstandard.ZstdError, ValueError) as exc:
        raise InvalidFieldError(f"zstd: {exc}", field="body") from exc
    if not dobj.eof or dobj.unused_data:
        raise InvalidFieldError("zstd frame incomplete or followed by data", field="body")
    return raw


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


def _read_body(raw: bytes, layer_count: int, limits: PacketLimits) -> list[LayerRecord]:
    r = _Reader(raw)
    table = r.take(layer_count * LAYER_ENTRY_BYTES, "layer_table")
    entries: list[tuple[_Entry, int]] = []
    payload = 0
    for i, fields in enumerate(_ENTRY.iter_unpack(table)):
        e = _Entry(*fields)
        if i and e.layer_id <= entries[-1][0].layer_id:
            raise InvalidFieldError("layer ids must be strictly increasing",
                                    field=f"layer[{i}].layer_id")
        count, nbytes = _check_entry(i, e, limits)
        entries.append((e, count))
        payload += e.positions_bytes + nbytes
    _check_shared_projections([(e.kind, e.rank, e.variant) for e, _ in entries])
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
    _range(len(data), 0, limits.max_packet_bytes, "packet")
    r = _Reader(data)
    header, codec, flags, layer_count = _read_header(r, limits)
    body_len = r.unpack(_U32, "header.body_length")
    body = r.take(body_len, "body")
    kid = r.take(signing.KEY_ID_BYTES, "key_id")
    signature = r.take(signing.SIGNATURE_BYTES, "signature")
    if r.pos != len(data):
        raise TrailingDataError(f"{len(data) - r.pos} bytes after the signature", field="packet")
    if trusted_keys is not None:
        _verify(data[: -signing.SIGNATURE_BYTES], kid, signature, trusted_keys)
    raw = _decompress(body, layer_count, limits) if flags & FLAG_ZSTD else body
    records = _read_body(raw, layer_count, limits)
    return Packet(header, codec, records, kid, signature, compressed=bool(flags & FLAG_ZSTD))
