"""Write solar_edge/golden/golden.slr: a small deterministic packet, signed with a TEST-ONLY key.

The packet freezes format v1 (three layers: SPARSE_CORE/INT4, FACTORED_CORE/FLOAT16,
DENSE_FACTORS/INT3; uncompressed, so the bytes do not depend on the zstd version).
tests/test_packet.py decodes it field by field and re-encodes it to the same bytes
(Ed25519 signatures are deterministic). The signing key is derived from a public string
and committed beside the packet: it is for tests only and must never be trusted by a
device. Regenerate only on a deliberate, versioned format change:

    python scripts/make_golden_packet.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from solar_edge.format import signing
from solar_edge.format.packet import PacketHeader
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

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "solar_edge" / "golden"
PACKET = GOLDEN_DIR / "golden.slr"
TEST_KEY = GOLDEN_DIR / "TEST-ONLY-golden-signing.key"
TEST_PUB = GOLDEN_DIR / "TEST-ONLY-golden-signing.pub"
KEY_SEED_TEXT = b"solar-edge golden packet TEST-ONLY signing key (public, never trust)"


def test_only_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(KEY_SEED_TEXT).digest())


def golden_contents() -> tuple[PacketHeader, CodecHeader, list[LayerRecord]]:
    header = PacketHeader(
        fingerprint=hashlib.sha256(b"solar-edge golden bundle").digest(),
        adapter_id="golden-task.v1",
        adapter_version=7,
        metadata={"head_seed": 11, "labels": ["neg", "pos"], "task": "golden"},
    )
    codec = CodecHeader(seed=0x0123456789ABCDEF, prng=PrngKind.PHILOX4X32_10,
                        perturbation=PerturbationKind.UNIFORM)
    sparse = LayerRecord(
        layer_id=1, kind=RecordKind.SPARSE_CORE, rows=16, cols=16, rank=0,
        positions=np.array([0, 5, 17, 200, 255], np.uint32),
        values=QuantizedValues(ValueFormat.INT4, 5, group_size=4,
                               codes=np.array([7, -7, 3, 0, -1], np.int8),
                               scales=np.array([0.125, 0.5], np.float16)),
        variant=3, epsilon=0.25,
    )
    factored = LayerRecord(
        layer_id=4, kind=RecordKind.FACTORED_CORE, rows=3, cols=2, rank=2,
        values=QuantizedValues(ValueFormat.FLOAT16, 10, raw=np.array(
            [1.0, -2.0, 0.5, 0.25, -0.125, 3.0, 65504.0, -1e-3, 0.0, 6e-8], np.float16)),
        variant=1, epsilon=0.5,
    )
    dense = LayerRecord(
        layer_id=9, kind=RecordKind.DENSE_FACTORS, rows=4, cols=3, rank=1,
        values=QuantizedValues(ValueFormat.INT3, 7, group_size=3,
                               codes=np.array([3, -3, 2, -2, 1, -1, 0], np.int8),
                               scales=np.array([1.0, 0.0625, 2.0], np.float16)),
    )
    return header, codec, [sparse, factored, dense]


def build() -> bytes:
    header, codec, records = golden_contents()
    return encode_packet(header, codec, records, test_only_key(), compress=False)


def main() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    key = test_only_key()
    signing.save_private_key(key, TEST_KEY, overwrite=True)
    signing.save_public_key(key, TEST_PUB)
    data = build()
    PACKET.write_bytes(data)
    print(f"wrote {PACKET} ({len(data)} bytes, key id {signing.key_id(key).hex()})")


if __name__ == "__main__":
    main()
