"""Hostile but validly signed packets: a real packet, one field mutated, re-signed.

Mutants start from a real packet (the golden packet, or :func:`bundle_packet`, one made for
a real bundle so that mutants get past the base fingerprint and reach the device decoders),
change its fields (metadata value types and string encodings, header integers, layer-table
shapes and kinds with a payload of the matching size, counts) or its bytes, and are signed
again with the TEST-ONLY golden key, so that they pass the signature check and reach the
semantic checks. Every function takes a :class:`random.Random`, so a run is reproducible
from its seed. Parsing here is the test suite's own (with :mod:`packet_spec`), independent
of :mod:`solar_edge.format.reader`.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from packet_spec import RawPacket, leb128, pack_bits

from solar_edge.format import signing
from solar_edge.format.packet import PacketHeader
from solar_edge.format.records import CodecHeader, LayerRecord, QuantizedValues, RecordKind
from solar_edge.format.records import ValueFormat as F
from solar_edge.format.writer import encode_packet

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "solar_edge" / "golden"
KEY = signing.load_private_key(GOLDEN_DIR / "TEST-ONLY-golden-signing.key")
TRUSTED = [KEY.public_key()]
GOLDEN = (GOLDEN_DIR / "golden.slr").read_bytes()

ENTRY = struct.Struct("<HBBHHIIfIIH")
PACKED = {0: 32, 1: 16}  # float formats: bits per value; integer formats: their bits


def _value_count(kind: int, rows: int, cols: int, rank: int, pcount: int) -> int:
    """Values a record carries (written from docs/packet-format.md, not the reader's rules)."""
    if kind == 1:
        return pcount
    if kind in (2, 3):
        return (rows + cols) * rank
    if kind == 4:
        return rows + rank
    return rows * cols


def _values_bytes(fmt: int, count: int, group: int) -> int:
    if fmt in PACKED:
        return count * PACKED[fmt] // 8
    return 2 * -(-count // max(group, 1)) + -(-count * fmt // 8)


def parse(data: bytes) -> RawPacket:
    """An uncompressed packet's fields as a :class:`RawPacket` (lengths recomputed on build)."""
    pos = 4 + 2 + 2 + 32
    id_len = data[pos]
    adapter_id = data[pos + 1 : pos + 1 + id_len]
    pos += 1 + id_len
    version, prng, pert, seed = struct.unpack_from("<QBBQ", data, pos)
    pos += 18
    (meta_len,) = struct.unpack_from("<H", data, pos)
    metadata = data[pos + 2 : pos + 2 + meta_len]
    pos += 2 + meta_len
    (count,) = struct.unpack_from("<H", data, pos)
    pos += 2 + 4
    entries = [list(ENTRY.unpack_from(data, pos + i * ENTRY.size)) for i in range(count)]
    pos += count * ENTRY.size
    payloads = []
    for e in entries:
        pbytes = e[9]
        vbytes = _values_bytes(e[2], _value_count(e[1], e[5], e[6], e[4], e[8]), e[10])
        payloads.append([data[pos : pos + pbytes], data[pos + pbytes : pos + pbytes + vbytes]])
        pos += pbytes + vbytes
    return RawPacket(flags=0, fingerprint=data[8:40], adapter_id=adapter_id,
                     adapter_version=version, prng=prng, perturbation=pert, seed=seed,
                     metadata=metadata, entries=entries, payloads=payloads)


def resign(data: bytes) -> bytes:
    """Replace the last 64 bytes by the test key's signature over the rest."""
    if len(data) < 64:
        return data
    return data[:-64] + KEY.sign(data[:-64])


# --- metadata -----------------------------------------------------------------------------

def _deep(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


TYPE_ZOO: list[object] = [
    0, 1, -1, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30, 10**400, 1.5, -0.0,
    1e308, 5e-324, "", "x", "neg", "a" * 300, True, False, None, [], [1], ["a"], ["a", "a"],
    ["a", 1], [[]], {}, {"a": 1}, {"type": "x"}, _deep(15), _deep(40), _deep(900),
    "a\u0000b", "\u001b[2J", "\u007f", "\u0085", "\ufeff", "\uffff", "\U0001f600", "\u202e",
]
FIELDS = ["task", "labels", "head_seed", "head", "canary", "update_digest", "zz_unknown"]


def canonical(obj: object) -> bytes:
    """Canonical metadata bytes; strings that are not UTF-8-encodable (lone surrogates) are
    written as JSON escapes, which is what a hostile writer would do."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


# Encodings a JSON string value may hold: raw invalid UTF-8, overlong forms, CESU-8
# surrogates, raw control bytes, JSON escapes of surrogates and NUL, non-canonical escapes.
BAD_STRING_BYTES = [
    b"\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xc0\x80", b"\xed\xa0\x80",
    b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\x80", b"\xc3", b"\x00", b"\x1f", b"\\ud800",
    b"\\udfff", b"\\ud800\\u0041", b"\\u0000", b"\\u00e9", b"\\/", b"\\x41", b"\\",
    "\u202e".encode(), "\u2067".encode(),   # right-to-left override and isolate
]


def metadata_mutants(rng: random.Random, base: dict) -> Iterator[tuple[str, bytes]]:
    """(name, metadata bytes): every field x every type of the zoo, then hostile strings
    (as values and as keys), and nested head / canary / update digest fields with wrong
    types."""
    for name in FIELDS:
        for i, value in enumerate(TYPE_ZOO):
            yield f"meta.{name}={i}", canonical({**base, name: value})
    for i, raw in enumerate(BAD_STRING_BYTES):
        for where in ("task", "labels", "key"):
            good = canonical({**base, "task": "QQQ"} if where != "labels" else
                             {**base, "labels": ["QQQ", "pos"]})
            if where == "key":
                good = canonical({**base, "QQQ": 1})
            yield f"meta.str[{i}].{where}", good.replace(b"QQQ", b"a" + raw + b"b")
    head = {"type": "sequence-classification", "weight": "w", "bias": None,
            "tensors": [{"name": "w", "shape": [2, 48]}]}
    for key in ("type", "weight", "bias", "pooler", "pooling", "activation", "tensors"):
        for value in rng.sample(TYPE_ZOO, 8):
            yield f"meta.head.{key}", canonical({**base, "head": {**head, key: value}})
    for value in rng.sample(TYPE_ZOO, 10):
        t = {"name": "w", "shape": [2, 48]}
        yield "meta.head.tensor", canonical({**base, "head": {**head, "tensors": [
            {**t, rng.choice(["name", "shape"]): value}]}})
    canary = {"digest": [[0.5, 1.0]], "tolerance": 0.1}
    for field in ("canary", "update_digest"):
        for key in ("digest", "tolerance"):
            for value in rng.sample(TYPE_ZOO, 10) + [[[1.0], [1.0, 2.0]], [[1e309]], [[10**400]]]:
                yield f"meta.{field}.{key}", canonical({**base, field: {**canary, key: value}})


# --- layer table ----------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 47, 48, 49, 96, 97, 144, 145, 255, 256, 4095,
               4096, 4097, 2**15, 2**16 - 1, 2**16, 2**22, 2**24, 2**31 - 1, 2**32 - 1]
ENTRY_FIELDS = ["layer_id", "kind", "fmt", "variant", "rank", "rows", "cols", "eps", "pcount",
                "pbytes", "group"]
FIELD_MAX = {"layer_id": 2**16 - 1, "kind": 255, "fmt": 255, "variant": 2**16 - 1,
             "rank": 2**16 - 1, "group": 2**16 - 1}
MAX_BUILT_VALUES = 1 << 16  # payloads larger than this are left wrong-sized, not built


def valid_payload(rng: random.Random, e: list) -> list[bytes] | None:
    """Positions and values of the size entry ``e`` declares, with valid content (None when
    that would be too large to build); also sets ``e``'s positions byte length."""
    kind, fmt, rows, cols, rank, pcount, group = e[1], e[2], e[5], e[6], e[4], e[8], e[10]
    count = _value_count(kind, rows, cols, rank, pcount)
    if count > MAX_BUILT_VALUES or (kind == 1 and not pcount <= rows * cols <= 2**62):
        return None
    pos = b""
    if kind == 1 and pcount:
        cells = sorted(rng.sample(range(rows * cols), pcount))
        pos = b"".join(leb128(int(d)) for d in np.diff([0] + cells))
        e[9] = len(pos)
    if fmt in PACKED:
        dtype = "<f4" if fmt == 0 else "<f2"
        vals = (np.asarray([rng.uniform(-0.01, 0.01) for _ in range(count)])).astype(dtype)
        return [pos, vals.tobytes()]
    if not 2 <= fmt <= 8 or group < 1:
        return [pos, b""]
    q = (1 << (fmt - 1)) - 1
    scales = np.asarray([rng.uniform(0, 1e-2) for _ in range(-(-count // group))], "<f2")
    return [pos, scales.tobytes() + pack_bits([rng.randint(-q, q) for _ in range(count)], fmt)]


def _pick(rng: random.Random, name: str, sizes: Sequence[int] = ()) -> int | float:
    if name == "eps":
        return rng.choice([0.0, 0.5, -1.0, math.inf, math.nan, 1e38, 5e-45])
    if sizes and name in ("rows", "cols", "rank") and rng.random() < 0.5:
        return rng.choice(sizes)
    value = rng.choice(INTERESTING + [rng.randrange(2**16)])
    return min(value, FIELD_MAX.get(name, 2**32 - 1))


def entry_mutant(rng: random.Random, raw: RawPacket, sizes: Sequence[int] = ()) -> str:
    """Mutate one or two fields of one entry; rebuild its payload to the declared size when
    it is small, so the mutant reaches the semantic checks and the decoders."""
    i = rng.randrange(len(raw.entries))
    names = rng.sample(ENTRY_FIELDS, rng.choice([1, 1, 2]))
    for name in names:
        raw.entries[i][ENTRY_FIELDS.index(name)] = _pick(rng, name, sizes)
    if rng.random() < 0.8:
        payload = valid_payload(rng, raw.entries[i])
        if payload is not None:
            raw.payloads[i] = payload
    return f"entry.{'+'.join(names)}"


def kind_swap(rng: random.Random, raw: RawPacket, sizes: Sequence[int] = ()) -> str:
    """A record becomes another kind with the fields that kind needs, sized to fit (with
    ``sizes``, rows and cols are often set to one of them: a bundle's layer dimensions)."""
    i = rng.randrange(len(raw.entries))
    e = raw.entries[i]
    kind = rng.randrange(1, 8)
    e[1] = kind
    if sizes and rng.random() < 0.5:
        e[5], e[6] = rng.choice(sizes), rng.choice(sizes)
    e[3] = e[3] if kind in (1, 2, 4) else 0
    e[7] = e[7] if kind in (1, 2) else 0.0
    e[4] = 0 if kind in (1, 5, 6, 7) else max(1, min(e[4] or 1, e[5], e[6]))
    if kind in (6, 7):
        e[6] = 1
    if kind != 1:
        e[8] = e[9] = 0
    raw.payloads[i] = valid_payload(rng, e) or raw.payloads[i]
    return f"kind->{kind}"


def count_mutant(rng: random.Random, raw: RawPacket, sizes: Sequence[int] = ()) -> str:
    op = rng.randrange(4)
    if op == 0 and raw.entries:
        i = rng.randrange(len(raw.entries))
        raw.entries.insert(i, list(raw.entries[i]))
        raw.payloads.insert(i, list(raw.payloads[i]))
        return "count.duplicate"
    if op == 1 and raw.entries:
        i = rng.randrange(len(raw.entries))
        del raw.entries[i], raw.payloads[i]
        return "count.drop"
    if op == 2:
        raw.layer_count = rng.choice([0, len(raw.entries) + 1, max(len(raw.entries) - 1, 0),
                                      2**16 - 1])
        return "count.layer_count"
    raw.body_length = rng.choice([0, 1, 2**31, 2**32 - 1])
    return "count.body_length"


def header_mutant(rng: random.Random, raw: RawPacket, sizes: Sequence[int] = ()) -> str:
    name = rng.choice(["adapter_version", "seed", "prng", "perturbation", "flags", "adapter_id",
                       "fingerprint"])
    if name == "adapter_version":
        raw.adapter_version = rng.choice([0, 1, 2**64 - 2, 2**64 - 1, 2**63])
    elif name == "seed":
        raw.seed = rng.choice([0, 1, 2**64 - 1, rng.randrange(2**64)])
    elif name in ("prng", "perturbation"):
        setattr(raw, name, rng.choice([0, 1, 2, 255]))
    elif name == "flags":
        raw.flags = rng.choice([1, 2, 0x8000, 0xFFFF])
    elif name == "adapter_id":
        raw.adapter_id = rng.choice([b"", b"a" * 64, b"a" * 65, b"..", b"a/b", b"a\x00",
                                     b"\xff\xfe", "é".encode(), b"-x", b"ok.id"])
    else:
        raw.fingerprint = bytes(32)
    return f"header.{name}"


def structure_mutant(rng: random.Random, base: bytes, adapter_id: bytes | None = None,
                     sizes: Sequence[int] = ()) -> tuple[str, bytes]:
    """One structure-aware, re-signed mutant of ``base`` (an uncompressed packet).
    ``adapter_id``: the id to give it unless the header mutation picks one (a runtime
    refuses a version of an id that it already installed, before decoding anything).
    ``sizes``: dimensions worth trying for rows, cols and rank (a bundle's, see
    :func:`bundle_sizes`), besides the generic boundary values."""
    raw = parse(base)
    if adapter_id is not None:
        raw.adapter_id = adapter_id
    ops: list[Callable[[random.Random, RawPacket, Sequence[int]], str]] = [
        entry_mutant, entry_mutant, entry_mutant, kind_swap, kind_swap, count_mutant,
        header_mutant]
    if rng.random() < 0.2:
        name, raw.metadata = rng.choice(list(metadata_mutants(rng, json.loads(raw.metadata))))
    else:
        name = rng.choice(ops)(rng, raw, sizes)
    return name, raw.build(KEY)


def byte_mutant(rng: random.Random, data: bytes) -> bytes:
    """Bit flips, interesting bytes, insertions, deletions, truncation (not re-signed)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.45 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif op < 0.7 and out:
            out[rng.randrange(len(out))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op < 0.8:
            at = rng.randrange(len(out) + 1)
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.9 and out:
            at = rng.randrange(len(out))
            del out[at : at + rng.randint(1, 8)]
        else:
            out = out[: rng.randrange(len(out) + 1)]
    return bytes(out)


# --- a packet for a real bundle ---------------------------------------------------------------

def _f32(rng: np.random.Generator, n: int, scale: float = 1e-3) -> QuantizedValues:
    return QuantizedValues(F.FLOAT32, n, raw=(rng.standard_normal(n) * scale).astype(np.float32))


def bundle_packet(fingerprint: bytes, shapes: dict[int, tuple[int, int]], basis_rank: int,
                  version: int = 1, adapter_id: str = "fuzz") -> bytes:
    """A valid uncompressed packet for a bundle (its fingerprint, ``{layer id: (out, in)}``
    and basis rank) with one record of most kinds, small values: it applies cleanly, so
    mutants of it reach the decoders and the runtime's checks."""
    rng = np.random.default_rng(7)
    ids = sorted(shapes)
    (o0, i0), (o1, i1), (o2, i2), (o3, i3) = (shapes[x] for x in ids[:4])
    r = min(8, basis_rank)
    records = [
        LayerRecord(ids[0], RecordKind.SPARSE_CORE, r, r, 0, _f32(rng, 5),
                    positions=np.array([0, 3, 9, 17, r * r - 1], np.uint32), variant=1,
                    epsilon=0.25),
        LayerRecord(ids[1], RecordKind.FACTORED_CORE, r, r, 2, _f32(rng, 4 * r), epsilon=0.5),
        LayerRecord(ids[2], RecordKind.DENSE_FACTORS, o2, i2, 1, _f32(rng, o2 + i2)),
        LayerRecord(ids[2], RecordKind.MAGNITUDE_DELTA, o2, 1, 0, _f32(rng, o2)),
        LayerRecord(ids[3], RecordKind.VERA_SCALES, o3, i3, 4, _f32(rng, o3 + 4), variant=5),
    ]
    header = PacketHeader(fingerprint, adapter_id, version,
                          {"head_seed": 3, "labels": ["neg", "pos"], "task": "fuzz"})
    return encode_packet(header, CodecHeader(seed=99), records, KEY, compress=False)


def with_metadata(packet: bytes, extra: dict, version: int) -> bytes:
    """``packet`` (uncompressed) re-signed as ``version`` with ``extra`` added to its
    metadata."""
    raw = parse(packet)
    raw.metadata = canonical({**json.loads(raw.metadata), **extra})
    raw.adapter_version = version
    return raw.build(KEY)


def bundle_sizes(shapes: dict[int, tuple[int, int]], basis_rank: int) -> list[int]:
    """A bundle's layer dimensions and basis rank, each also off by one."""
    dims = {d for shape in shapes.values() for d in shape} | {basis_rank}
    return sorted({d + k for d in dims for k in (-1, 0, 1)} - {0})
