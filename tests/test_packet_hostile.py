"""Hostile packets: every malformed input must end in a PacketError subclass naming the field.

Packets are forged one field at a time with the independent spec writer in packet_spec.py,
starting from the golden packet. Most cases are decoded twice: unsigned inspection
(``trusted_keys=None``) and re-signed by a trusted key, so the reader's checks are shown to
hold after the signature has been accepted too.
"""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections.abc import Callable

import pytest
import zstandard
from hostile_packets import byte_mutant
from packet_spec import RawPacket, f16, golden_key, leb128

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
from solar_edge.format import signing
from solar_edge.format.packet import PacketLimits
from solar_edge.format.reader import decode_packet

KEY = golden_key()
TRUSTED = [KEY.public_key()]
GOLDEN = RawPacket().build()
FIELDS = ["id", "kind", "fmt", "variant", "rank", "rows", "cols", "eps", "pcount", "pbytes",
          "group"]


def entry(i: int, **changes: object) -> Callable[[RawPacket], None]:
    """Mutator: set named fields of layer-table entry ``i``."""
    def apply(raw: RawPacket) -> None:
        for name, value in changes.items():
            raw.entries[i][FIELDS.index(name)] = value
    return apply


def payload(i: int, part: int, data: bytes, pbytes: bool = False) -> Callable[[RawPacket], None]:
    """Mutator: replace positions (part 0) or values (part 1) of layer ``i``."""
    def apply(raw: RawPacket) -> None:
        raw.payloads[i][part] = data
        if pbytes:
            raw.entries[i][FIELDS.index("pbytes")] = len(data)
    return apply


def forge(change: dict | Callable[[RawPacket], None]) -> bytes:
    raw = RawPacket()
    if callable(change):
        change(raw)
    else:
        raw = raw.with_(**change)
    return raw.build(KEY)


def expect(data: bytes, error: type[PacketError], field: str | None, **kw: object) -> PacketError:
    with pytest.raises(PacketError) as info:
        decode_packet(data, **kw)
    assert type(info.value) is error, info.value
    if field is not None:
        assert info.value.field == field, info.value
    return info.value


# --- truncation and trailing data ------------------------------------------------------

@pytest.mark.parametrize("trusted", [None, TRUSTED], ids=["unsigned", "trusted"])
def test_truncation_at_every_offset(trusted):
    for n in range(len(GOLDEN)):
        with pytest.raises(PacketError) as info:
            decode_packet(GOLDEN[:n], trusted_keys=trusted)
        assert type(info.value) is TruncatedPacketError, (n, info.value)


def test_truncation_of_a_compressed_packet_at_every_offset():
    raw = RawPacket()
    body = raw.table_and_payload()
    frame = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(body)
    data = raw.with_(flags=1, body=struct.pack("<I", len(body)) + frame).build(KEY)
    assert decode_packet(data, TRUSTED).compressed
    for n in range(len(data)):
        with pytest.raises(TruncatedPacketError):
            decode_packet(data[:n], TRUSTED)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 64, GOLDEN])
def test_trailing_bytes_after_signature(extra):
    expect(GOLDEN + extra, TrailingDataError, "packet")
    expect(GOLDEN + extra, TrailingDataError, "packet", trusted_keys=TRUSTED)


# --- header fields ---------------------------------------------------------------------

HEADER_CASES = [
    ("magic", {"magic": b"SLRQ"}, BadMagicError, "header.magic"),
    ("magic-zeros", {"magic": b"\0\0\0\0"}, BadMagicError, "header.magic"),
    ("version-0", {"version": 0}, UnsupportedVersionError, "header.version"),
    ("version-2", {"version": 2}, UnsupportedVersionError, "header.version"),
    ("version-max", {"version": 0xFFFF}, UnsupportedVersionError, "header.version"),
    ("flag-bit-1", {"flags": 2}, InvalidFieldError, "header.flags"),
    ("flag-bit-15", {"flags": 0x8001}, InvalidFieldError, "header.flags"),
    ("zstd-flag-on-plain-body", {"flags": 1}, LimitExceededError, "body.raw_length"),
    ("id-empty", {"adapter_id": b""}, InvalidFieldError, "header.adapter_id"),
    ("id-65", {"adapter_id": b"a" * 65}, InvalidFieldError, "header.adapter_id"),
    ("id-dotdot", {"adapter_id": b"../etc/passwd"}, InvalidFieldError, "header.adapter_id"),
    ("id-dots", {"adapter_id": b".."}, InvalidFieldError, "header.adapter_id"),
    ("id-slash", {"adapter_id": b"a/b"}, InvalidFieldError, "header.adapter_id"),
    ("id-backslash", {"adapter_id": b"a\\b"}, InvalidFieldError, "header.adapter_id"),
    ("id-dash", {"adapter_id": b"-rf"}, InvalidFieldError, "header.adapter_id"),
    ("id-nul", {"adapter_id": b"a\x00b"}, InvalidFieldError, "header.adapter_id"),
    ("id-utf8", {"adapter_id": "é".encode()}, InvalidFieldError, "header.adapter_id"),
    ("id-len-past-end", {"adapter_id_len": 255}, InvalidFieldError, "header.adapter_id"),
    ("prng-0", {"prng": 0}, InvalidFieldError, "codec.prng"),
    ("prng-2", {"prng": 2}, InvalidFieldError, "codec.prng"),
    ("perturbation-2", {"perturbation": 2}, InvalidFieldError, "codec.perturbation"),
    ("meta-empty", {"metadata": b""}, InvalidFieldError, "header.metadata"),
    ("meta-too-long", {"metadata": b'{"a":"' + b"x" * 4091 + b'"}'}, LimitExceededError,
     "header.metadata"),
    ("meta-len-max", {"metadata_len": 0xFFFF}, LimitExceededError, "header.metadata"),
    ("meta-not-json", {"metadata": b"{nope}"}, InvalidFieldError, "header.metadata"),
    ("meta-array", {"metadata": b"[1,2]"}, InvalidFieldError, "header.metadata"),
    ("meta-spaces", {"metadata": b'{"a": 1}'}, InvalidFieldError, "header.metadata"),
    ("meta-unsorted", {"metadata": b'{"b":1,"a":2}'}, InvalidFieldError, "header.metadata"),
    ("meta-duplicate", {"metadata": b'{"a":1,"a":2}'}, InvalidFieldError, "header.metadata"),
    ("meta-nan", {"metadata": b'{"a":NaN}'}, InvalidFieldError, "header.metadata"),
    ("meta-bad-utf8", {"metadata": b'{"a":"\xff"}'}, InvalidFieldError, "header.metadata"),
    ("meta-deep", {"metadata": b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}"}, InvalidFieldError,
     "header.metadata"),
    ("layers-over-limit", {"layer_count": 4097}, LimitExceededError, "header.layer_count"),
    ("layers-fewer", {"layer_count": 2}, TrailingDataError, "body"),
    ("layers-more", {"layer_count": 5}, TruncatedPacketError, "layer_table"),
    ("body-length-short", {"body_length": 131}, TrailingDataError, "packet"),
    ("body-length-long", {"body_length": 133}, TruncatedPacketError, "signature"),
    ("body-length-max", {"body_length": 0xFFFFFFFF}, TruncatedPacketError, "body"),
]


@pytest.mark.parametrize("change, error, field", [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
@pytest.mark.parametrize("trusted", [None, TRUSTED], ids=["unsigned", "trusted"])
def test_corrupted_header_field(change, error, field, trusted):
    expect(forge(change), error, field, trusted_keys=trusted)


def test_empty_and_non_bytes_input():
    expect(b"", TruncatedPacketError, "header.magic")
    expect(object(), PacketError, "packet")  # type: ignore[arg-type]


def test_packet_size_cap_comes_first():
    expect(GOLDEN, LimitExceededError, "packet", limits=PacketLimits(max_packet_bytes=339))
    expect(b"X" * 100, LimitExceededError, "packet", limits=PacketLimits(max_packet_bytes=99))


# --- layer table and payload -----------------------------------------------------------

NAN16, INF16, NEG16 = b"\x00\x7e", b"\x00\x7c", b"\x00\xb8"
BODY_CASES = [
    ("ids-and-kind-equal", entry(1, id=1, kind=1), InvalidFieldError, "layer[1].layer_id"),
    ("ids-decreasing", entry(2, id=0), InvalidFieldError, "layer[2].layer_id"),
    ("kind-0", entry(0, kind=0), InvalidFieldError, "layer[0].kind"),
    ("kind-8", entry(2, kind=8), InvalidFieldError, "layer[2].kind"),
    ("head-tensor-undeclared", entry(2, kind=5, rank=0), InvalidFieldError, "layer_table"),
    ("bias-with-rank", entry(2, kind=6), InvalidFieldError, "layer[2].rank"),
    ("bias-not-a-vector", entry(2, kind=6, rank=0), InvalidFieldError, "layer[2].cols"),
    ("format-9", entry(1, fmt=9), InvalidFieldError, "layer[1].format"),
    ("format-255", entry(1, fmt=255), InvalidFieldError, "layer[1].format"),
    ("rows-0", entry(1, rows=0), InvalidFieldError, "layer[1].rows"),
    ("cols-over-limit", entry(1, cols=2**16 + 1), LimitExceededError, "layer[1].cols"),
    ("rows-2^32-1", entry(0, rows=2**32 - 1), LimitExceededError, "layer[0].rows"),
    ("eps-nan", entry(0, eps=float("nan")), InvalidFieldError, "layer[0].epsilon"),
    ("eps-inf", entry(1, eps=float("inf")), InvalidFieldError, "layer[1].epsilon"),
    ("eps-negative", entry(1, eps=-0.5), InvalidFieldError, "layer[1].epsilon"),
    ("dense-eps", entry(2, eps=0.5), InvalidFieldError, "layer[2].epsilon"),
    ("dense-variant", entry(2, variant=1), InvalidFieldError, "layer[2].variant"),
    ("sparse-rank", entry(0, rank=1), InvalidFieldError, "layer[0].rank"),
    ("factored-rank-0", entry(1, rank=0), InvalidFieldError, "layer[1].rank"),
    ("factored-rank-gt-min", entry(1, rank=3), InvalidFieldError, "layer[1].rank"),
    ("factored-rank-limit", entry(1, rank=5000), LimitExceededError, "layer[1].rank"),
    ("factored-positions", entry(1, pcount=1, pbytes=1), InvalidFieldError, "layer[1].positions"),
    ("positions-2^31", entry(0, pcount=2**31), LimitExceededError, "layer[0].position_count"),
    ("positions-gt-cells", entry(0, rows=2, cols=2), InvalidFieldError,
     "layer[0].position_count"),
    ("pbytes-lt-count", entry(0, pbytes=4), InvalidFieldError, "layer[0].positions_bytes"),
    ("pbytes-gt-5count", entry(0, pbytes=26), InvalidFieldError, "layer[0].positions_bytes"),
    ("values-2^29", entry(1, rows=2**16, cols=2**16, rank=4096), LimitExceededError,
     "layer[1].value_count"),
    ("group-0-int", entry(0, group=0), InvalidFieldError, "layer[0].group_size"),
    ("group-on-float", entry(1, group=4), InvalidFieldError, "layer[1].group_size"),
    ("payload-extra", payload(2, 1, f16([1, 0.0625, 2]) + b"\x8f\xd5\x11\x00"),
     TrailingDataError, "body"),
    ("payload-short", payload(1, 1, b"\x00" * 19), TruncatedPacketError, "body"),
    ("pos-zero-delta", payload(0, 0, b"\x00\x05\x00\xb7\x01\x37"), InvalidFieldError,
     "layer[0].positions"),
    ("pos-index-256", payload(0, 0, b"\x00\x05\x0c\xb7\x01\x38"), InvalidFieldError,
     "layer[0].positions"),
    ("pos-overlong", payload(0, 0, b"\x00\x85\x00\x0c\xb7\x01\x37", pbytes=True),
     InvalidFieldError, "layer[0].positions"),
    ("pos-above-2^32", payload(0, 0, b"\x00\x05\x0c\xb7\x01" + b"\xff" * 4 + b"\x1f", True),
     InvalidFieldError, "layer[0].positions"),
    ("pos-six-byte-varint", payload(0, 0, b"\x00\x05\x0c\xb7\x01\x81\x80\x80\x80\x80\x01", True),
     InvalidFieldError, "layer[0].positions"),
    ("pos-unterminated", payload(0, 0, b"\x00\x05\x0c\xb7\x01\xb7"), InvalidFieldError,
     "layer[0].positions"),
    ("pos-wraps-2^32", lambda r: (entry(0, rows=2**16, cols=2**16)(r), payload(
        0, 0, b"".join(leb128(d) for d in (0, 5, 12, 2**32 - 1, 55)), True)(r)),
     InvalidFieldError, "layer[0].positions"),
    ("scale-nan", payload(0, 1, f16([0.125]) + NAN16 + b"\x1f\x8b\x07"), InvalidFieldError,
     "layer[0].scales"),
    ("scale-inf", payload(2, 1, INF16 + f16([1, 1]) + b"\x8f\xd5\x11"), InvalidFieldError,
     "layer[2].scales"),
    ("scale-negative", payload(0, 1, NEG16 + f16([0.5]) + b"\x1f\x8b\x07"), InvalidFieldError,
     "layer[0].scales"),
    ("code-offset-zero", payload(0, 1, f16([0.125, 0.5]) + b"\x10\x8b\x07"), InvalidFieldError,
     "layer[0].codes"),
    ("code-padding-bits", payload(0, 1, f16([0.125, 0.5]) + b"\x1f\x8b\x17"), InvalidFieldError,
     "layer[0].codes"),
    ("float-value-nan", payload(1, 1, NAN16 + b"\x00" * 18), InvalidFieldError,
     "layer[1].values"),
    ("float-value-inf", payload(1, 1, b"\x00" * 18 + INF16), InvalidFieldError,
     "layer[1].values"),
]


@pytest.mark.parametrize("change, error, field", [c[1:] for c in BODY_CASES],
                         ids=[c[0] for c in BODY_CASES])
@pytest.mark.parametrize("trusted", [None, TRUSTED], ids=["unsigned", "trusted"])
def test_corrupted_layer_table_or_payload(change, error, field, trusted):
    expect(forge(change), error, field, trusted_keys=trusted)


def test_golden_payload_literals_are_the_ones_mutated_above():
    """The byte strings mutated in BODY_CASES are the golden ones (so each case changes one
    thing)."""
    raw = RawPacket()
    assert raw.payloads[0] == [b"\x00\x05\x0c\xb7\x01\x37", f16([0.125, 0.5]) + b"\x1f\x8b\x07"]
    assert raw.payloads[2][1] == f16([1.0, 0.0625, 2.0]) + b"\x8f\xd5\x11"


# --- signatures ------------------------------------------------------------------------

def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("offset", [0, 8, 60, 140, 250, len(GOLDEN) - 72, len(GOLDEN) - 1])
def test_any_flipped_bit_fails_the_signature_or_an_earlier_check(offset):
    with pytest.raises(PacketError) as info:
        decode_packet(_flip(GOLDEN, offset), trusted_keys=TRUSTED)
    assert isinstance(info.value, SignatureError) or offset < 8, info.value


def test_signature_errors():
    other = signing.generate_private_key()
    expect(GOLDEN, SignatureError, "key_id", trusted_keys=[])
    expect(GOLDEN, SignatureError, "key_id", trusted_keys=[other.public_key()])
    # key id of a trusted key, signature by another key
    forged = RawPacket(key_id=signing.key_id(other)).build(KEY)
    expect(forged, SignatureError, "signature", trusted_keys=[other.public_key(), *TRUSTED])
    expect(_flip(GOLDEN, len(GOLDEN) - 1), SignatureError, "signature", trusted_keys=TRUSTED)
    by_id = {signing.key_id(KEY): KEY.public_key()}
    assert decode_packet(GOLDEN, trusted_keys=by_id).header.adapter_id == "golden-task.v1"


def test_without_trusted_keys_the_signature_is_not_checked():
    """Inspection mode, documented: a device must always pass its keys."""
    assert decode_packet(_flip(GOLDEN, len(GOLDEN) - 1)).header.adapter_version == 7


# --- zstd bodies -----------------------------------------------------------------------

def _zstd_packet(frame: bytes, raw_len: int, **raw_fields: object) -> bytes:
    return RawPacket(flags=1, body=struct.pack("<I", raw_len) + frame, **raw_fields).build(KEY)


BODY = RawPacket().table_and_payload()
FRAME = zstandard.ZstdCompressor(level=3).compress(BODY)


@pytest.mark.parametrize("data, error, field, limits", [
    (_zstd_packet(FRAME, len(BODY) + 1), InvalidFieldError, "body", None),
    (_zstd_packet(FRAME, len(BODY) - 1), InvalidFieldError, "body", None),
    (_zstd_packet(FRAME + b"\x00", len(BODY)), InvalidFieldError, "body", None),
    (_zstd_packet(FRAME + FRAME, len(BODY)), InvalidFieldError, "body", None),
    (_zstd_packet(FRAME + b"\x50\x2a\x4d\x18\x00\x00\x00\x00", len(BODY)),  # skippable frame
     InvalidFieldError, "body", None),
    (_zstd_packet(FRAME[:-2], len(BODY)), InvalidFieldError, "body", None),
    (_zstd_packet(b"not zstd at all", len(BODY)), InvalidFieldError, "body", None),
    (_zstd_packet(b"", 0), TruncatedPacketError, "layer_table", None),
    (RawPacket(flags=1, body=b"\x01\x02").build(KEY), TruncatedPacketError, "body.raw_length",
     None),
    (_zstd_packet(FRAME, 2**31), LimitExceededError, "body.raw_length", None),
    (_zstd_packet(FRAME, len(BODY)), LimitExceededError, "body.raw_length",
     PacketLimits(max_body_bytes=len(BODY) - 1)),
    (_zstd_packet(zstandard.ZstdCompressor().compress(BODY + b"\x00"), len(BODY) + 1),
     TrailingDataError, "body", None),
])
def test_hostile_zstd_bodies(data, error, field, limits):
    expect(data, error, field, trusted_keys=TRUSTED, limits=limits or PacketLimits())


@pytest.mark.parametrize("level, checksum, content_size, padding", [
    (1, False, False, 0), (19, True, True, 0), (3, True, False, 300_000),
    (-5, False, True, 300_000),
])
def test_valid_frames_of_every_header_form_and_many_blocks_decode(level, checksum,
                                                                  content_size, padding):
    """The reader finds a frame's end from its header and block headers: with and without
    checksum and content size, and over several 128 KiB blocks (a padding head tensor)."""
    raw = RawPacket()
    if padding:
        rows, cols = 300, padding // 600  # float16: 2 bytes a value
        raw.metadata = (b'{"head":{"tensors":[{"name":"w","shape":[%d,%d]}],"type":"x"},'
                        b'"head_seed":11,"labels":["neg","pos"],"task":"golden"}' % (rows, cols))
        raw.entries.append([0, 5, 1, 0, 0, rows, cols, 0.0, 0, 0, 0])
        raw.payloads.append([b"", f16([(i % 97) / 97 for i in range(rows * cols)])])
        raw.entries.sort(key=lambda e: (e[0], e[1]))
        raw.payloads = [raw.payloads[-1], *raw.payloads[:-1]]
    body = raw.table_and_payload()
    frame = zstandard.ZstdCompressor(level=level, write_checksum=checksum,
                                     write_content_size=content_size).compress(body)
    packet = decode_packet(_zstd_packet(frame, len(body), metadata=raw.metadata,
                                        entries=raw.entries), TRUSTED)
    assert packet.compressed and len(packet.records) == len(raw.entries)


def test_zstd_window_above_the_cap_is_refused():
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = cobj.compress(BODY) + cobj.flush()  # streamed: no size known, large window kept
    assert zstandard.get_frame_parameters(frame).window_size == 2**27
    expect(_zstd_packet(frame, len(BODY)), InvalidFieldError, "body", trusted_keys=TRUSTED)


# --- no allocation in proportion to a claimed count ------------------------------------

PERMISSIVE = PacketLimits(max_values_per_layer=2**62, max_positions_per_layer=2**32,
                          max_rows=2**32 - 1, max_cols=2**32 - 1, max_rank=2**16 - 1,
                          max_body_bytes=2**32, max_values_per_packet=2**64,
                          max_projection_values=2**64)


def _peak_bytes(data: bytes, error: type[PacketError], limits: PacketLimits) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(error):
            decode_packet(data, trusted_keys=TRUSTED, limits=limits)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("change, error", [
    (entry(0, pcount=2**31, pbytes=2**31, rows=2**16, cols=2**16), TruncatedPacketError),
    (entry(0, pcount=2**31 - 1, pbytes=2**32 - 1, rows=2**31, cols=2), TruncatedPacketError),
    (entry(1, rows=2**31, cols=2**31, rank=2**16 - 1), TruncatedPacketError),
    (entry(2, rows=2**32 - 1, cols=2**32 - 1, rank=2**16 - 1, group=1), TruncatedPacketError),
    ({"layer_count": 0xFFFF}, TruncatedPacketError),
    ({"body_length": 2**32 - 1}, TruncatedPacketError),
    ({"metadata_len": 0xFFFF}, LimitExceededError),
])
def test_claimed_counts_of_2_31_fail_before_allocating(change, error):
    limits = PacketLimits(**{**PERMISSIVE.__dict__, "max_layers": 2**16,
                             "max_metadata_bytes": 2**16})
    assert _peak_bytes(forge(change), error, limits) < 64 * 1024


def test_zstd_bomb_is_cut_at_the_declared_length():
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\x00" * (64 * 2**20))
    assert len(bomb) < 64 * 1024
    data = _zstd_packet(bomb, 100_000)
    assert _peak_bytes(data, InvalidFieldError, PacketLimits()) < 2 * 2**20


def test_declared_raw_length_of_2_31_allocates_only_real_output():
    data = _zstd_packet(FRAME, 2**31)
    assert _peak_bytes(data, InvalidFieldError, PERMISSIVE) < 256 * 1024


def _ratio_bomb(layers: int) -> bytes:
    """A valid, highly compressible body: ``layers`` FACTORED_CORE INT2 records of 2**24
    values each (4 MiB of codes per layer), zstd-compressed to a few KiB, re-signed."""
    count, group = 2**24, 0xFFFF
    table = b"".join(struct.pack("<HBBHHIIfIIH", i, 2, 2, 0, 2**11, 2**12, 2**12, 0.0, 0, 0,
                                 group) for i in range(layers))
    payload = (f16([1e-3] * -(-count // group)) + b"\x55" * (count // 4)) * layers
    frame = zstandard.ZstdCompressor(level=3).compress(table + payload)
    return _zstd_packet(frame, len(table) + len(payload), metadata=b"{}",
                        entries=[[0] * 11] * layers)


def test_compression_ratio_bomb_is_refused_at_its_table_before_the_payload_is_decoded():
    """15 x 2**24 values in a 2.4 KiB packet: the reader used to decode all 60 MiB and
    unpack 251M codes (400 MiB, 5 s) and accept it; now the table's total is checked
    against max_values_per_packet before the payload is decompressed."""
    data = _ratio_bomb(15)
    assert len(data) < 4096
    assert _peak_bytes(data, LimitExceededError, PacketLimits()) < 256 * 1024
    with pytest.raises(LimitExceededError) as info:
        decode_packet(data, TRUSTED)
    assert info.value.field == "layer_table.value_count"
    # at the limit it decodes (2 x 2**24 values)
    packet = decode_packet(_ratio_bomb(2), TRUSTED)
    assert sum(r.values.count for r in packet.records) == 2**25


def test_the_writer_refuses_more_values_than_a_packet_may_hold():
    from solar_edge.format.writer import encode_packet

    packet = decode_packet(GOLDEN, TRUSTED)  # 5 + 10 + 7 values
    with pytest.raises(LimitExceededError) as info:
        encode_packet(packet.header, packet.codec, packet.records, KEY,
                      limits=PacketLimits(max_values_per_packet=21))
    assert info.value.field == "layer_table.value_count"
    assert encode_packet(packet.header, packet.codec, packet.records, KEY, compress=False,
                         limits=PacketLimits(max_values_per_packet=22)) == GOLDEN


# --- bounded, seeded fuzzing ------------------------------------------------------------

def _resign(data: bytes) -> bytes:
    if len(data) < 64:
        return data
    return data[:-64] + KEY.sign(data[:-64])


@pytest.mark.parametrize("compressed", [False, True])
def test_random_mutations_raise_only_packet_errors(compressed):
    base = GOLDEN if not compressed else _zstd_packet(FRAME, len(BODY))
    rng = random.Random(20261128 + compressed)
    outcomes: dict[str, int] = {}
    for _ in range(1500):
        data = byte_mutant(rng, base)
        for candidate, trusted in ((data, None), (_resign(data), TRUSTED)):
            try:
                decode_packet(candidate, trusted_keys=trusted)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except PacketError as exc:
                assert exc.field, exc
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
    # the fuzzer reached deep checks, not only the first one
    assert {"TruncatedPacketError", "InvalidFieldError"} <= set(outcomes), outcomes
    assert len(outcomes) >= 4, outcomes
    print(outcomes)
