"""Hostile but validly signed packets reach only typed errors, at a bounded cost.

Mutants come from :mod:`hostile_packets` (a real packet, fields mutated, re-signed with the
TEST-ONLY key). The bounded fuzz runs here are seeded; ``scripts/fuzz_packets.py`` is the
long run. "Typed" means a :class:`~solar_edge.errors.SolarEdgeError` subclass; anything
else fails the test with the mutant that raised it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import hostile_packets as hp
import numpy as np
import pytest
from packet_spec import RawPacket

from solar_edge.errors import (
    CodecError,
    InvalidFieldError,
    LimitExceededError,
    PacketError,
    RuntimeApplyError,
    SolarEdgeError,
)
from solar_edge.format.packet import PacketHeader, PacketLimits
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import CodecHeader, LayerRecord
from solar_edge.format.writer import encode_packet
from solar_edge.methods.vera import VeraProjections

GOLDEN_META = json.loads(hp.parse(hp.GOLDEN).metadata)


def _outcome(data: bytes, trusted: object) -> str:
    try:
        decode_packet(data, trusted_keys=trusted)  # type: ignore[arg-type]
        return "ok"
    except PacketError as exc:
        assert exc.field, exc
        return type(exc).__name__


def _golden_with(metadata: bytes) -> bytes:
    return hp.parse(hp.GOLDEN).with_(metadata=metadata).build(hp.KEY)


# --- unencodable strings and wrongly typed metadata ----------------------------------------

@pytest.mark.parametrize("raw", hp.BAD_STRING_BYTES)
@pytest.mark.parametrize("where", ["task", "labels", "key"])
def test_unencodable_or_unprintable_strings_are_invalid_fields(raw, where):
    mutants = dict((name, m) for name, m in hp.metadata_mutants(random.Random(0), GOLDEN_META))
    data = _golden_with(mutants[f"meta.str[{hp.BAD_STRING_BYTES.index(raw)}].{where}"])
    for trusted in (None, hp.TRUSTED):  # refused before and after the signature check
        with pytest.raises(InvalidFieldError) as info:
            decode_packet(data, trusted_keys=trusted)
        assert info.value.field.startswith("header.metadata"), info.value


WRONG_TYPES = {
    "labels": [5, "neg", None, True, {}, [], [1], ["a", "a"], [""], ["a" * 300], [["a"]]],
    "head_seed": [-1, 2**64, 10**30, "1", None, 1.5, True, [], {}],
    "task": [1, None, True, [], {}],
    "head": [1, "x", None, [], {}, {"type": 1}, {"type": "x", "tensors": "w"}],
    "canary": [1, "x", None, {"digest": [[1.0]], "tolerance": 0},
               {"digest": [[1.0], [1.0, 2.0]], "tolerance": 0.1}],
    "update_digest": [1, "x", None, [], {"digest": [[1.0]]}, {"digest": [[1.0]], "tolerance": 2},
                      {"digest": [[1.0], [1.0, 2.0]], "tolerance": 0.1},
                      {"digest": [[1e301]], "tolerance": 0.1}],
}


@pytest.mark.parametrize("field, value", [(f, v) for f, vs in WRONG_TYPES.items() for v in vs],
                         ids=[f"{f}={v!r}"[:40] for f, vs in WRONG_TYPES.items() for v in vs])
def test_known_metadata_fields_of_the_wrong_type_are_refused(field, value):
    data = _golden_with(hp.canonical({**GOLDEN_META, field: value}))
    with pytest.raises(InvalidFieldError) as info:
        decode_packet(data, trusted_keys=hp.TRUSTED)
    assert info.value.field == f"header.metadata.{field}", info.value


@pytest.mark.parametrize("value, accepted", [
    (2**64 - 1, True), (-(2**63), True), (1e308, True), ("\U0001f600", True),
    (2**64, False), (-(2**63) - 1, False), (10**400, False), ("a\u0000b", False),
    ("\u001b[2J", False), ("\u0085", False), ("\uffff", False), (hp._deep(15), True),
    (hp._deep(16), False), (hp._deep(900), False),
])
def test_value_rules_hold_for_unknown_fields_too(value, accepted):
    data = _golden_with(hp.canonical({**GOLDEN_META, "zz": value}))
    assert _outcome(data, hp.TRUSTED) == ("ok" if accepted else "InvalidFieldError")


def test_every_metadata_type_mutant_is_a_typed_error_or_valid():
    outcomes: Counter[str] = Counter()
    for name, meta in hp.metadata_mutants(random.Random(1), GOLDEN_META):
        data = _golden_with(meta)
        got = _outcome(data, hp.TRUSTED)
        assert got == _outcome(data, None), name
        outcomes[got] += 1
    assert outcomes["InvalidFieldError"] > 300 and outcomes["ok"] > 10, outcomes


def test_the_writer_refuses_what_the_reader_refuses():
    header, codec, records = _golden_contents()
    for meta in ({"task": "a\ud800"}, {"task": "a\x00"}, {"labels": ["a"], "head_seed": -1},
                 {"zz": 2**64}, {"zz": hp._deep(20)}):
        with pytest.raises(InvalidFieldError):
            encode_packet(PacketHeader(header.fingerprint, "a", 1, meta), codec, records,
                          hp.KEY)


def test_cli_inspect_run_publish_print_one_line_for_an_unencodable_label(tmp_path, tiny_bundle):
    bad = tmp_path / "bad.slr"
    bad.write_bytes(_golden_with(b'{"head_seed":11,"labels":["\\ud800","pos"],"task":"g"}'))
    pub = hp.GOLDEN_DIR / "TEST-ONLY-golden-signing.pub"
    key = hp.GOLDEN_DIR / "TEST-ONLY-golden-signing.key"
    for args in (["inspect", str(bad)], ["inspect", str(bad), "--key", str(pub)],
                 ["run", str(bad), "--bundle", str(tiny_bundle), "--key", str(pub),
                  "--text", "hi"],
                 ["publish", str(bad), "--key", str(key), "--out", str(tmp_path / "repo")]):
        proc = subprocess.run([sys.executable, "-m", "solar_edge.cli", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "InvalidFieldError: header.metadata" in proc.stderr, proc.stderr


# --- versions -----------------------------------------------------------------------------

def _golden_contents() -> tuple[PacketHeader, CodecHeader, list[LayerRecord]]:
    packet = decode_packet(hp.GOLDEN, hp.TRUSTED)
    return packet.header, packet.codec, packet.records


@pytest.mark.parametrize("version", [0, 2**64 - 1])
def test_versions_0_and_2_64_minus_1_are_refused_by_reader_writer_and_runtime(version,
                                                                            tiny_bundle):
    from solar_edge.runtime.engine import EdgeRuntime

    data = RawPacket(adapter_version=version).build(hp.KEY)
    for trusted in (None, hp.TRUSTED):
        with pytest.raises(InvalidFieldError) as info:
            decode_packet(data, trusted_keys=trusted)
        assert info.value.field == "header.adapter_version"
    header, codec, records = _golden_contents()
    bad = PacketHeader(header.fingerprint, header.adapter_id, version, header.metadata)
    with pytest.raises(InvalidFieldError):
        encode_packet(bad, codec, records, hp.KEY)
    rt = EdgeRuntime(str(tiny_bundle), hp.TRUSTED)
    shapes = {lid: s.shape for lid, s in rt.bundle.slots.items()}
    good = hp.bundle_packet(rt.bundle.fingerprint, shapes, 48, version=2**64 - 2)
    for method in (rt.stage, rt.apply):
        with pytest.raises(InvalidFieldError):
            method(hp.parse(good).with_(adapter_version=version).build(hp.KEY))
    assert rt.apply(good).version == 2**64 - 2 and rt.active is not None


# --- VeRA: sizes checked before any projection is generated ---------------------------------

def _vera_packet(fingerprint: bytes, layer: int, rows: int, cols: int, rank: int) -> bytes:
    """One VERA_SCALES record (float16 values), re-signed: built raw, since the writer would
    refuse the sizes some tests need."""
    values = np.full(rows + rank, 1e-3, "<f2").tobytes()
    return RawPacket(fingerprint=fingerprint, metadata=b"{}",
                     entries=[[layer, 4, 1, 3, rank, rows, cols, 0.0, 0, 0, 0]],
                     payloads=[[b"", values]]).build(hp.KEY)


def _peak(fn) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        fn()
        return None, tracemalloc.get_traced_memory()[1]
    except SolarEdgeError as exc:
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_vera_shape_beyond_the_bundle_layer_fails_before_projections(tiny_bundle):
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(tiny_bundle), hp.TRUSTED)
    # within the packet limits (rank * (rows + cols) = 2**23) but the layer is 48 x 96
    data = _vera_packet(rt.bundle.fingerprint, 3, 2**14, 2**14 - 256, 256)
    assert decode_packet(data, hp.TRUSTED).records[0].rows == 2**14
    err, peak = _peak(lambda: rt.apply(data))
    assert isinstance(err, RuntimeApplyError) and "not the weight's 48x96" in str(err), err
    assert peak < 4 * 2**20, peak  # the projections would be 32 MiB (float32)
    assert rt.active is None


@pytest.mark.parametrize("kind, rows, cols, rank, pcount", [
    (1, 4096, 4096, 0, 5), (2, 4096, 4096, 1, 0), (3, 4096, 4096, 1, 0), (6, 60000, 1, 0, 0),
    (7, 60000, 1, 0, 0), (4, 8192, 1024, 64, 0),
], ids=["sparse", "factored", "dense", "bias", "magnitude", "vera"])
def test_every_kind_beyond_its_layer_fails_before_allocating(kind, rows, cols, rank, pcount,
                                                             tiny_bundle):
    """Small packets whose records claim dimensions far beyond layer 3 (48 x 96, basis rank
    48): refused by the shape check, before a basis column, a factor or a projection."""
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(tiny_bundle), hp.TRUSTED)
    e = [3, kind, 1, 0, rank, rows, cols, 0.0, pcount, 0, 0]
    payload = hp.valid_payload(random.Random(0), e)
    assert payload is not None
    data = RawPacket(fingerprint=rt.bundle.fingerprint, metadata=b"{}", entries=[e],
                     payloads=[payload]).build(hp.KEY)
    err, peak = _peak(lambda: rt.apply(data))
    assert isinstance(err, RuntimeApplyError) and "layer 3" in str(err), err
    assert peak < 2 * 2**20, peak


def test_vera_projections_above_the_limit_are_refused_by_the_reader_and_the_writer():
    data = _vera_packet(bytes(32), 0, 2**15, 2**15, 256)  # 2**24 projection values
    for trusted in (None, hp.TRUSTED):
        with pytest.raises(LimitExceededError) as info:
            decode_packet(data, trusted_keys=trusted)
        assert info.value.field == "VERA_SCALES.projection_values"
    packet = decode_packet(data, hp.TRUSTED, PacketLimits(max_projection_values=2**24))
    with pytest.raises(LimitExceededError):
        encode_packet(packet.header, packet.codec, packet.records, hp.KEY)


def test_vera_generation_checks_its_budget_before_the_prng():
    err, peak = _peak(lambda: VeraProjections.generate(1, 4096, 2**16, 2**16))
    assert isinstance(err, CodecError) and "above the limit" in str(err), err
    assert peak < 64 * 1024, peak
    # a projection at the limit costs its own 4 bytes per value plus one chunk
    err, peak = _peak(lambda: VeraProjections.generate(1, 512, 2**13, 2**13))
    assert err is None and peak < 4 * 2**23 + 4 * 2**20, peak


# --- bounded fuzz runs ----------------------------------------------------------------------

def test_fuzz_decode_packet_bytes_and_structure():
    """A few thousand byte-level and structure-aware mutants (re-signed) within ~20 s."""
    rng = random.Random(20261201)
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + 20
    header, codec, records = _golden_contents()
    compressed = encode_packet(header, codec, records, hp.KEY, compress=True)
    n = 0
    while n < 4000 and time.monotonic() < deadline:
        if n % 2:
            name, data = hp.structure_mutant(rng, hp.GOLDEN)
            candidates = [(data, hp.TRUSTED)]
        else:
            name = "bytes"
            data = hp.byte_mutant(rng, hp.GOLDEN if n % 4 else compressed)
            candidates = [(data, None), (data, hp.TRUSTED), (hp.resign(data), hp.TRUSTED)]
        for candidate, trusted in candidates:
            try:
                outcomes[_outcome(candidate, trusted)] += 1
            except Exception as exc:  # noqa: BLE001 (the point of the test)
                pytest.fail(f"{name}: untyped {type(exc).__name__}: {exc}")
        n += 1
    print(n, dict(outcomes))
    assert n >= 2000, n
    assert {"ok", "InvalidFieldError", "TruncatedPacketError", "LimitExceededError",
            "TrailingDataError", "SignatureError"} <= set(outcomes), outcomes


def test_fuzz_runtime_apply_with_resigned_mutants(tiny_bundle):
    """Five hundred re-signed mutants of a packet made for a real exported bundle through
    ``EdgeRuntime.apply``: typed errors only, and a refused packet changes nothing served."""
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(tiny_bundle), hp.TRUSTED)
    shapes = {lid: s.shape for lid, s in rt.bundle.slots.items()}
    base = hp.bundle_packet(rt.bundle.fingerprint, shapes, rt.bundle.dims(0).rank)
    sizes = hp.bundle_sizes(shapes, rt.bundle.dims(0).rank)
    rt.apply(base)
    feeds = rt.family.feeds(rt.family.health_input)
    probe = rt.infer(feeds)
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    for i in range(500):
        name, data = hp.structure_mutant(rng, base, b"m%d" % i, sizes)
        try:
            rt.apply(data)
            outcomes["ok"] += 1
            rt.activate("fuzz")
        except SolarEdgeError as exc:
            outcomes[type(exc).__name__] += 1
            assert rt.active is not None and rt.active.adapter_id == "fuzz", name
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{name}: untyped {type(exc).__name__}: {exc}")
    print(dict(outcomes))
    np.testing.assert_array_equal(rt.infer(feeds), probe)
    # the mutants reached the decoders and the staging checks, not only the reader
    assert outcomes["ok"] >= 50 and outcomes["RuntimeApplyError"] >= 20, outcomes
    assert outcomes["InvalidFieldError"] >= 100, outcomes


def test_scripted_long_run_smoke(tmp_path):
    """scripts/fuzz_packets.py at a tiny size: its JSON report has the fields documented."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_packets.py"
    proc = subprocess.run([sys.executable, str(script), "--decode", "300", "--apply", "0",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["decode"]["mutants"] == 300 and report["untyped"] == 0
    assert report["peak_rss_mib"] > 0 and sum(report["decode"]["outcomes"].values()) >= 300
