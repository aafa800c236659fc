"""VeRA carried exactly and coefficient-only (solar_edge.methods.vera, record kind VERA_SCALES).

The device regenerates PEFT's shared projections from the key alone; these tests hold the
regenerated draws against torch's own (PEFT's initialiser with torch's generator), check the
packet rules of the new record kind with packets forged from the spec, and check that a real
PEFT VeRA adapter decodes to what PEFT merges.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import numpy as np
import pytest
from packet_spec import RawPacket, f16, golden_key

from solar_edge.decode import decode_factors
from solar_edge.encode.quant import quantize
from solar_edge.errors import AdapterError, CodecError, InvalidFieldError
from solar_edge.format import signing
from solar_edge.format.packet import PacketHeader
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import CodecHeader, LayerRecord, RecordKind, ValueFormat
from solar_edge.format.writer import encode_packet
from solar_edge.methods.vera import (
    VeraProjections,
    check_saved_projections,
    projections_for,
    vera_records,
)

KEY = signing.generate_private_key()


@pytest.mark.parametrize(("key", "rank", "max_out", "max_in"),
                         [(0, 8, 20, 12), (1234, 256, 384, 384), (0xFFFF, 16, 1536, 384)])
def test_projections_are_torchs_draws_bit_for_bit(key: int, rank: int, max_out: int,
                                                  max_in: int) -> None:
    torch = pytest.importorskip("torch")
    peft_vera = pytest.importorskip("peft.tuners.vera.model")
    gen = torch.Generator(device="cpu").manual_seed(key)
    want_a = peft_vera._kaiming_init((rank, max_in), generator=gen).numpy()
    want_b = peft_vera._kaiming_init((max_out, rank), generator=gen).numpy()
    proj = VeraProjections.generate(key, rank, max_out, max_in)
    assert np.array_equal(proj.A, want_a) and np.array_equal(proj.B, want_b)
    assert check_saved_projections(want_a, want_b, key) == 0.0
    with pytest.raises(AdapterError, match="not the draw"):
        check_saved_projections(want_a, want_b, key ^ 1)


def test_keys_beyond_u16_and_bad_shapes_are_refused() -> None:
    with pytest.raises(CodecError):
        VeraProjections.generate(0x10000, 4, 8, 8)
    with pytest.raises(CodecError):
        VeraProjections.generate(0, 0, 8, 8)
    with pytest.raises(AdapterError):
        vera_records({0: (np.ones(4), np.ones(2))}, {0: (4, 3)}, key=70000)
    with pytest.raises(AdapterError, match="lambda_b"):
        vera_records({0: (np.ones(5), np.ones(2))}, {0: (4, 3)}, key=1)


def _records(rng: np.random.Generator, key: int = 5) -> list[LayerRecord]:
    shapes = {0: (6, 4), 3: (9, 5), 4: (6, 7)}
    scales = {lid: (rng.standard_normal(o), rng.standard_normal(3)) for lid, (o, _) in
              shapes.items()}
    return vera_records(scales, shapes, key)


def test_decode_is_the_peft_formula_with_the_packets_widest_shapes() -> None:
    rng = np.random.default_rng(0)
    records = _records(rng)
    data = encode_packet(PacketHeader(b"\0" * 32, "v", 1, {}), CodecHeader(seed=0), records, KEY)
    packet = decode_packet(data, [KEY.public_key()])
    proj = projections_for(packet.records)
    assert proj is not None and proj.A.shape == (3, 7) and proj.B.shape == (9, 3)
    for rec in packet.records:
        b = rec.values.dequantize()[: rec.rows]
        d = rec.values.dequantize()[rec.rows:]
        want = np.diag(b) @ proj.B[: rec.rows] @ np.diag(d) @ proj.A[:, : rec.cols]
        L, Rt = decode_factors(rec, None, packet.codec, proj)
        np.testing.assert_allclose(L @ Rt.T, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(CodecError, match="projections"):
        decode_factors(packet.records[0], None, packet.codec, None)


def test_records_that_disagree_on_rank_or_key_are_refused_both_ways() -> None:
    rng = np.random.default_rng(1)
    records = _records(rng)
    odd = LayerRecord(9, RecordKind.VERA_SCALES, 6, 4, 3, quantize(np.ones(9), ValueFormat.FLOAT32),
                      variant=6)
    with pytest.raises(InvalidFieldError, match="disagree"):
        encode_packet(PacketHeader(b"\0" * 32, "v", 1, {}), CodecHeader(seed=0),
                      [*records, odd], KEY)
    # forged from the spec: two VERA_SCALES entries (float16) with ranks 2 and 3
    entries = [[0, 4, 1, 5, 2, 4, 3, 0.0, 0, 0, 0], [1, 4, 1, 5, 3, 4, 3, 0.0, 0, 0, 0]]
    payloads = [[b"", f16([0.5] * 6)], [b"", f16([0.5] * 7)]]
    forged = RawPacket(entries=entries, payloads=payloads).build()
    with pytest.raises(InvalidFieldError, match="disagree"):
        decode_packet(forged, [golden_key().public_key()])
    same = RawPacket(entries=[entries[0], [1, 4, 1, 5, 2, 4, 3, 0.0, 0, 0, 0]],
                     payloads=[payloads[0], [b"", f16([0.5] * 6)]]).build()
    assert len(decode_packet(same, [golden_key().public_key()]).records) == 2
    eps = RawPacket(entries=[[0, 4, 1, 5, 2, 4, 3, 0.5, 0, 0, 0]], payloads=[payloads[0]])
    with pytest.raises(InvalidFieldError, match="epsilon"):
        decode_packet(eps.build(), [golden_key().public_key()])
    pos = RawPacket(entries=[[0, 4, 1, 5, 2, 4, 3, 0.0, 1, 1, 0]],
                    payloads=[[struct.pack("<B", 0), f16([0.5] * 6)]])
    with pytest.raises(InvalidFieldError, match="positions"):
        decode_packet(pos.build(), [golden_key().public_key()])


def test_real_peft_vera_packet_decodes_to_peft_merge(vera_adapter_dir: Path, minilm_base,
                                                    minilm_bundle: Path) -> None:
    import torch
    from peft import PeftModel

    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.matching import match_to_bundle
    from solar_edge.methods.peft_files import read_adapter
    from solar_edge.methods.vera import carry

    bundle = load_bundle(minilm_bundle)
    adapter = read_adapter(vera_adapter_dir)
    assert adapter.parts is not None and adapter.parts.key == 7
    updates = match_to_bundle(adapter.updates, bundle.layers)
    records = carry(adapter, updates, None)
    assert all(r.kind == RecordKind.VERA_SCALES for r in records) and len(records) == 12
    data = encode_packet(PacketHeader(bundle.fingerprint, "vera", 1, {}), CodecHeader(seed=0),
                         records, KEY)
    assert len(data) < 12 * (384 + 32) * 4 + 400  # scales only: no projections, no factors
    packet = decode_packet(data, [KEY.public_key()])
    proj = projections_for(packet.records)
    _, model = minilm_base
    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(vera_adapter_dir))
    merged = merged.merge_and_unload()
    names = {layer.id: layer.name for layer in bundle.layers}
    modules = dict(merged.named_modules())
    for rec in packet.records:
        L, Rt = decode_factors(rec, None, packet.codec, proj)
        w0 = np.asarray(bundle.base_weight(rec.layer_id), np.float32)
        with torch.no_grad():
            want = modules[names[rec.layer_id]].weight.numpy() - w0
        assert np.abs(L @ Rt.T - want).max() < 1e-5 * max(1.0, float(np.abs(want).max()))
    other = read_adapter(vera_adapter_dir)
    object.__setattr__(other.parts, "key", 8)
    with pytest.raises(AdapterError, match="not the draw"):
        carry(other, updates, None)
