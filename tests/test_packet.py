"""Packet format v1: golden vector, round trips, sizes, writer-side checks, key files."""

from __future__ import annotations

import hashlib
import stat
from importlib import resources

import numpy as np
import pytest
from packet_spec import GOLDEN_F16, RawPacket, golden_key

from solar_edge.errors import KeyFileError, LimitExceededError, PacketError
from solar_edge.format import bitpack, layout, signing
from solar_edge.format.metadata import canonical_metadata
from solar_edge.format.packet import PacketHeader, PacketLimits
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    PrngKind,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet

GOLDEN = resources.files("solar_edge") / "golden"


def golden_bytes() -> bytes:
    return (GOLDEN / "golden.slr").read_bytes()


@pytest.fixture(scope="module")
def key() -> signing.Ed25519PrivateKey:
    return signing.generate_private_key()


# --- golden ----------------------------------------------------------------------------

def test_golden_matches_independent_spec_writer():
    assert RawPacket().build() == golden_bytes()


def test_golden_decodes_to_expected_fields():
    pub = signing.load_public_key(GOLDEN / "TEST-ONLY-golden-signing.pub")
    p = decode_packet(golden_bytes(), trusted_keys=[pub])
    assert p.header.fingerprint == hashlib.sha256(b"solar-edge golden bundle").digest()
    assert p.header.adapter_id == "golden-task.v1"
    assert p.header.adapter_version == 7
    assert p.header.metadata == {"head_seed": 11, "labels": ["neg", "pos"], "task": "golden"}
    assert p.codec == CodecHeader(0x0123456789ABCDEF, PrngKind.PHILOX4X32_10,
                                  PerturbationKind.UNIFORM)
    assert p.key_id == signing.key_id(pub) == bytes.fromhex("5174136432bda28c")
    assert len(p.signature) == 64 and not p.compressed
    s, f, d = p.records
    assert (s.layer_id, s.kind, s.rows, s.cols, s.rank, s.variant, s.epsilon) == (
        1, RecordKind.SPARSE_CORE, 16, 16, 0, 3, 0.25)
    assert s.positions.dtype == np.uint32 and s.positions.tolist() == [0, 5, 17, 200, 255]
    assert (s.values.fmt, s.values.count, s.values.group_size) == (ValueFormat.INT4, 5, 4)
    assert s.values.codes.tolist() == [7, -7, 3, 0, -1]
    assert s.values.scales.tolist() == [0.125, 0.5]
    assert s.values.dequantize().tolist() == [0.875, -0.875, 0.375, 0.0, -0.5]
    assert (f.layer_id, f.kind, f.rows, f.cols, f.rank, f.variant, f.epsilon) == (
        4, RecordKind.FACTORED_CORE, 3, 2, 2, 1, 0.5)
    assert f.positions.size == 0 and f.values.fmt == ValueFormat.FLOAT16
    assert f.values.raw.dtype == np.float16
    assert f.values.raw.tolist() == np.array(GOLDEN_F16, np.float16).tolist()
    assert (d.layer_id, d.kind, d.rows, d.cols, d.rank, d.variant, d.epsilon) == (
        9, RecordKind.DENSE_FACTORS, 4, 3, 1, 0, 0.0)
    assert d.values.codes.tolist() == [3, -3, 2, -2, 1, -1, 0]
    assert d.values.dequantize().tolist() == [3.0, -3.0, 2.0, -0.125, 0.0625, -0.0625, 0.0]


def test_golden_reencodes_to_identical_bytes():
    private = signing.load_private_key(GOLDEN / "TEST-ONLY-golden-signing.key")
    assert signing.public_key_bytes(private) == signing.public_key_bytes(golden_key())
    p = decode_packet(golden_bytes())
    again = encode_packet(p.header, p.codec, p.records, private, compress=False)
    assert again == golden_bytes()
    assert len(again) == layout.packet_nbytes(p.header, p.records) == 340


# --- round trips -----------------------------------------------------------------------

def _values(fmt: ValueFormat, count: int, rng: np.random.Generator, group: int = 5):
    if fmt == ValueFormat.FLOAT32:
        return QuantizedValues(fmt, count, raw=rng.normal(size=count).astype(np.float32))
    if fmt == ValueFormat.FLOAT16:
        return QuantizedValues(fmt, count, raw=rng.normal(size=count).astype(np.float16))
    q = (1 << (fmt.bits - 1)) - 1
    codes = rng.integers(-q, q + 1, size=count).astype(np.int8)
    codes[:2] = [q, -q][: count]  # the extremes always appear
    scales = np.abs(rng.normal(size=-(-count // group))).astype(np.float16)
    return QuantizedValues(fmt, count, group, codes=codes, scales=scales)


def _records(fmt: ValueFormat, rng: np.random.Generator) -> list[LayerRecord]:
    positions = np.sort(rng.choice(40 * 30, size=37, replace=False)).astype(np.uint32)
    positions[-1] = 40 * 30 - 1  # the largest valid index
    return [
        LayerRecord(7, RecordKind.FACTORED_CORE, 12, 9, 3, _values(fmt, 63, rng),
                    variant=65535, epsilon=1e-3),
        LayerRecord(2, RecordKind.SPARSE_CORE, 40, 30, 0, _values(fmt, 37, rng),
                    positions=positions, variant=2, epsilon=0.125),
        LayerRecord(3, RecordKind.DENSE_FACTORS, 50, 20, 2, _values(fmt, 140, rng)),
    ]


HEADER = PacketHeader(hashlib.sha256(b"bundle").digest(), "task_A-1.v2", 2**64 - 2,
                      {"task": "démo", "labels": ["a", "b", "c"], "head_seed": 5})


@pytest.mark.parametrize("fmt", list(ValueFormat))
@pytest.mark.parametrize("compress", [False, True, None])
def test_round_trip_every_format(fmt, compress, key):
    rng = np.random.default_rng(int(fmt) * 10 + (compress is True))
    records = _records(fmt, rng)
    codec = CodecHeader(2**64 - 1, PrngKind.PHILOX4X32_10, PerturbationKind.RADEMACHER)
    data = encode_packet(HEADER, codec, records, key, compress=compress)
    p = decode_packet(data, trusted_keys={signing.key_id(key): key.public_key()})
    assert p.header == HEADER and p.codec == codec
    assert p.compressed == (compress is True or (compress is None and
                                                len(data) < layout.packet_nbytes(HEADER, records)))
    assert [r.layer_id for r in p.records] == [2, 3, 7]  # sorted on write
    for got in p.records:
        want = next(r for r in records if r.layer_id == got.layer_id)
        assert (got.kind, got.rows, got.cols, got.rank, got.variant) == (
            want.kind, want.rows, want.cols, want.rank, want.variant)
        assert got.epsilon == float(np.float32(want.epsilon))
        assert np.array_equal(got.positions, want.positions)
        assert got.values.fmt == want.values.fmt and got.values.count == want.values.count
        np.testing.assert_array_equal(got.values.dequantize(), want.values.dequantize())


def test_uncompressed_size_is_exactly_the_published_formula(key):
    rng = np.random.default_rng(1)
    for fmt in ValueFormat:
        records = _records(fmt, rng)
        data = encode_packet(HEADER, CodecHeader(1), records, key, compress=False)
        meta = canonical_metadata(HEADER.metadata)
        empty = encode_packet(HEADER, CodecHeader(1), [], key, compress=False)
        assert len(empty) == layout.fixed_overhead_bytes(HEADER.adapter_id, HEADER.metadata) == (
            139 + len(HEADER.adapter_id) + len(meta))
        assert len(data) == layout.packet_nbytes(HEADER, records)
        for r in records:  # each record's share, measured on a packet that holds only it
            alone = encode_packet(HEADER, CodecHeader(1), [r], key, compress=False)
            assert len(alone) - len(empty) == layout.record_nbytes(r)


def test_compression_used_when_it_wins(key):
    zeros = QuantizedValues(ValueFormat.FLOAT32, 2000, raw=np.zeros(2000, np.float32))
    records = [LayerRecord(0, RecordKind.DENSE_FACTORS, 1000, 1000, 1, zeros)]
    data = encode_packet(HEADER, CodecHeader(3), records, key)
    assert len(data) < layout.packet_nbytes(HEADER, records) // 10
    p = decode_packet(data, [key.public_key()])
    assert p.compressed and p.records[0].values.raw.tolist() == [0.0] * 2000


# --- bit-level encodings ---------------------------------------------------------------

@pytest.mark.parametrize("values, size", [
    ([0], 1), ([127], 1), ([128], 2), ([2**14 - 1], 2), ([2**14], 3), ([2**28], 5),
    ([0, 2**32 - 1], 1 + 5), ([5, 6, 2**21 + 6], 1 + 1 + 4), ([2**21 - 1], 3),
])
def test_varint_positions_round_trip_and_sizes(values, size):
    from packet_spec import leb128

    data = bitpack.encode_positions(np.array(values, np.uint64))
    deltas = np.diff(values, prepend=0)
    assert data == b"".join(leb128(int(d)) for d in deltas)
    assert len(data) == size == layout.positions_nbytes(np.array(values))
    assert bitpack.decode_positions(data, len(values)).tolist() == values


@pytest.mark.parametrize("bits", range(2, 9))
def test_code_packing_matches_spec_bit_order(bits):
    from packet_spec import pack_bits

    q = (1 << (bits - 1)) - 1
    codes = np.random.default_rng(bits).integers(-q, q + 1, size=29)
    data = bitpack.pack_codes(codes, bits)
    assert data == pack_bits(codes.tolist(), bits)
    assert bitpack.unpack_codes(data, bits, codes.size).tolist() == codes.tolist()


@pytest.mark.parametrize("bits, data, count, why", [
    (4, bytes([0x99, 0x19]), 3, "padding"),      # 3 codes, the unused high nibble set
    (4, bytes([0x09, 0x99]), 4, "symmetric"),    # low nibble 0: code -8
    (8, bytes([0x80, 0x00]), 2, "symmetric"),    # byte 0: code -128
    (3, bytes([0xFF, 0x03]), 3, "padding"),      # generic path: bits 0-8 used, bit 9 set
    (8, bytes([0x80]), 2, "code bytes"),
])
def test_unpacking_refuses_padding_bits_and_the_unused_code(bits, data, count, why):
    with pytest.raises(ValueError, match=why):
        bitpack.unpack_codes(data, bits, count)


# --- the writer refuses what the reader would reject -------------------------------------

def _sparse(**kw) -> LayerRecord:
    base = dict(layer_id=0, kind=RecordKind.SPARSE_CORE, rows=4, cols=4, rank=0,
                values=QuantizedValues(ValueFormat.FLOAT32, 2, raw=np.ones(2, np.float32)),
                positions=np.array([1, 3], np.uint32))
    return LayerRecord(**{**base, **kw})


@pytest.mark.parametrize("header, records, field", [
    (PacketHeader(b"x" * 31, "a", 1), [_sparse()], "header.fingerprint"),
    (PacketHeader(b"x" * 32, "../etc", 1), [_sparse()], "header.adapter_id"),
    (PacketHeader(b"x" * 32, "", 1), [_sparse()], "header.adapter_id"),
    (PacketHeader(b"x" * 32, "a" * 65, 1), [_sparse()], "header.adapter_id"),
    (PacketHeader(b"x" * 32, "a", -1), [_sparse()], "header.adapter_version"),
    (PacketHeader(b"x" * 32, "a", 1, {"x": float("nan")}), [_sparse()], "header.metadata"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(), _sparse()], "layer[1]"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(layer_id=70000)], "layer[0].layer_id"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(epsilon=float("nan"))], "layer[0].epsilon"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(rank=1)], "layer[0].rank"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(positions=np.array([3, 1]))], "layer[0].positions"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(positions=np.array([1, 16]))],
     "layer[0].positions"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(positions=np.array([1]))], "layer[0].values"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(values=QuantizedValues(
        ValueFormat.FLOAT32, 2, raw=np.array([1, np.inf], np.float32)))], "layer[0].values"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(values=QuantizedValues(
        ValueFormat.INT4, 2, 2, codes=np.array([8, 0], np.int8),
        scales=np.ones(1, np.float16)))], "layer[0].codes"),
    (PacketHeader(b"x" * 32, "a", 1), [_sparse(values=QuantizedValues(
        ValueFormat.INT4, 2, 2, codes=np.array([1, 0], np.int8),
        scales=np.array([-1.0], np.float16)))], "layer[0].scales"),
    (PacketHeader(b"x" * 32, "a", 1), [LayerRecord(
        0, RecordKind.DENSE_FACTORS, 2, 2, 1, QuantizedValues(
            ValueFormat.FLOAT16, 4, raw=np.ones(4, np.float16)), epsilon=0.5)],
     "layer[0].epsilon"),
    (PacketHeader(b"x" * 32, "a", 1), [LayerRecord(
        0, RecordKind.FACTORED_CORE, 2, 2, 3, QuantizedValues(
            ValueFormat.FLOAT16, 12, raw=np.ones(12, np.float16)))], "layer[0].rank"),
])
def test_writer_rejects_invalid_input(header, records, field, key):
    with pytest.raises(PacketError) as info:
        encode_packet(header, CodecHeader(1), records, key)
    assert info.value.field == field


def test_writer_enforces_size_limit(key):
    big = QuantizedValues(ValueFormat.FLOAT32, 2000, raw=np.arange(2000, dtype=np.float32))
    records = [LayerRecord(0, RecordKind.DENSE_FACTORS, 1000, 1000, 1, big)]
    with pytest.raises(LimitExceededError):
        encode_packet(HEADER, CodecHeader(1), records, key, compress=False,
                      limits=PacketLimits(max_packet_bytes=8000))


# --- key files -------------------------------------------------------------------------

def test_key_files_round_trip_and_permissions(tmp_path):
    key = signing.generate_private_key()
    priv = signing.save_private_key(key, tmp_path / "k.key")
    pub = signing.save_public_key(key, tmp_path / "k.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert len(pub.read_text().strip()) == 64
    assert signing.key_id(signing.load_private_key(priv)) == signing.key_id(key)
    assert signing.key_id(signing.load_public_key(pub)) == signing.key_id(key)
    assert signing.key_id(key) == hashlib.sha256(signing.public_key_bytes(key)).digest()[:8]
    pem = key.public_key().public_bytes(
        signing.serialization.Encoding.PEM, signing.serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k.pem").write_bytes(pem)
    assert signing.key_id(signing.load_public_key(tmp_path / "k.pem")) == signing.key_id(key)
    with pytest.raises(KeyFileError):
        signing.save_private_key(key, priv)  # never overwritten silently


@pytest.mark.parametrize("content", [b"", b"zz" * 32, b"ab" * 31, b"-----BEGIN PUBLIC KEY-----\n"])
def test_bad_public_key_files(tmp_path, content):
    (tmp_path / "bad.pub").write_bytes(content)
    with pytest.raises(KeyFileError):
        signing.load_public_key(tmp_path / "bad.pub")


def test_missing_and_bad_private_key_files(tmp_path):
    with pytest.raises(KeyFileError):
        signing.load_private_key(tmp_path / "absent.key")
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(KeyFileError):
        signing.load_private_key(tmp_path / "bad.key")


def test_keyring_rejects_mislabelled_keys():
    a, b = signing.generate_private_key(), signing.generate_private_key()
    with pytest.raises(KeyFileError, match="does not match"):
        signing.keyring({signing.key_id(a): b.public_key()})


def test_keyring_takes_key_files_or_one_key_and_refuses_other_types(tmp_path):
    key = signing.generate_private_key()
    path = signing.save_public_key(key, tmp_path / "k.pub")
    want = {signing.key_id(key): signing.public_key_bytes(key)}
    for given in ([path], [str(path)], key.public_key(), [key.public_key()]):
        ring = signing.keyring(given)
        assert {k: signing.public_key_bytes(v) for k, v in ring.items()} == want, given
    for bad, why in ((str(path), "got str"), (path.read_text().strip(), "got str"),
                     ([path.read_bytes()], "got bytes"), (7, "got int"), ([key], "got Ed25519")):
        with pytest.raises(KeyFileError, match=why):
            signing.keyring(bad)


# --- heads, biases and DoRA magnitudes -----------------------------------------------------

HEAD_META = {"labels": ["a", "b", "c"],
             "head": {"type": "classifier", "tensors": [{"name": "classifier.weight",
                                                         "shape": [3, 4]},
                                                        {"name": "classifier.bias",
                                                         "shape": [3]}]}}


def _vec(lid: int, kind: RecordKind, n: int, cols: int = 1) -> LayerRecord:
    values = QuantizedValues(ValueFormat.FLOAT16, n * cols,
                             raw=np.arange(n * cols, dtype=np.float16))
    return LayerRecord(lid, kind, n, cols, 0, values)


def test_a_layer_may_carry_factors_bias_and_magnitude_and_heads_their_own_ids(key):
    factors = LayerRecord(0, RecordKind.DENSE_FACTORS, 5, 4, 1,
                          QuantizedValues(ValueFormat.FLOAT32, 9, raw=np.ones(9, np.float32)))
    records = [_vec(0, RecordKind.MAGNITUDE_DELTA, 5), factors, _vec(0, RecordKind.BIAS_DELTA, 5),
               _vec(1, RecordKind.HEAD_TENSOR, 3), _vec(0, RecordKind.HEAD_TENSOR, 3, 4)]
    header = PacketHeader(bytes(32), "cls", 1, HEAD_META)
    back = decode_packet(encode_packet(header, CodecHeader(0), records, key), [key.public_key()])
    assert [(r.layer_id, r.kind) for r in back.records] == [
        (0, RecordKind.DENSE_FACTORS), (0, RecordKind.HEAD_TENSOR), (0, RecordKind.BIAS_DELTA),
        (0, RecordKind.MAGNITUDE_DELTA), (1, RecordKind.HEAD_TENSOR)]
    assert back.header.metadata == HEAD_META


@pytest.mark.parametrize(("records", "meta", "message"), [
    ([_vec(0, RecordKind.HEAD_TENSOR, 3, 4)], HEAD_META, "2 declared"),
    ([_vec(0, RecordKind.HEAD_TENSOR, 3, 4), _vec(1, RecordKind.HEAD_TENSOR, 4)], HEAD_META,
     "declares shape"),
    ([_vec(0, RecordKind.HEAD_TENSOR, 3, 4), _vec(2, RecordKind.HEAD_TENSOR, 3)], HEAD_META,
     "ids must be"),
    ([_vec(0, RecordKind.HEAD_TENSOR, 3)], {"labels": ["a"]}, "0 declared"),
    ([_vec(0, RecordKind.BIAS_DELTA, 3), _vec(0, RecordKind.BIAS_DELTA, 3)], {}, "duplicate"),
    ([], {"head": {"type": "x", "tensors": [{"name": "w", "shape": [0]}]}}, "shape"),
    ([], {"head": {"tensors": []}}, "type"),
])
def test_head_and_vector_records_are_checked_by_the_writer(records, meta, message, key):
    with pytest.raises(PacketError, match=message):
        encode_packet(PacketHeader(bytes(32), "cls", 1, meta), CodecHeader(0), records, key)
