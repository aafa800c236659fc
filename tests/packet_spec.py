"""A second, deliberately naive writer of packet format v1, written from docs/packet-format.md.

Tests use it to check that solar_edge.format.packet matches the spec byte for byte (the golden
packet is rebuilt here field by field) and to forge hostile packets one field at a time.
It shares no code with solar_edge.format.packet or solar_edge.format.bitpack.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

GOLDEN_KEY_SEED = b"solar-edge golden packet TEST-ONLY signing key (public, never trust)"
GOLDEN_METADATA = b'{"head_seed":11,"labels":["neg","pos"],"task":"golden"}'


def golden_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(GOLDEN_KEY_SEED).digest())


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pack_bits(codes: list[int], bits: int) -> bytes:
    """Offset-binary, least significant bit first, zero padding: one bit at a time."""
    stream = []
    for c in codes:
        u = c + (1 << (bits - 1))
        stream += [(u >> k) & 1 for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8))


def f16(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}e", *values)


def entry(layer_id: int, kind: int, fmt: int, variant: int, rank: int, rows: int, cols: int,
          epsilon: float, pcount: int, pbytes: int, group: int) -> bytes:
    return struct.pack("<HBBHHIIfIIH", layer_id, kind, fmt, variant, rank, rows, cols, epsilon,
                       pcount, pbytes, group)


GOLDEN_POSITIONS = b"".join(leb128(d) for d in (0, 5, 12, 183, 55))  # 0, 5, 17, 200, 255
GOLDEN_F16 = [1.0, -2.0, 0.5, 0.25, -0.125, 3.0, 65504.0, -1e-3, 0.0, 6e-8]
GOLDEN_ENTRIES = [
    # id, kind, fmt, variant, rank, rows, cols, eps, P, P bytes, G
    [1, 1, 4, 3, 0, 16, 16, 0.25, 5, len(GOLDEN_POSITIONS), 4],
    [4, 2, 1, 1, 2, 3, 2, 0.5, 0, 0, 0],
    [9, 3, 3, 0, 1, 4, 3, 0.0, 0, 0, 3],
]
GOLDEN_PAYLOADS = [
    [GOLDEN_POSITIONS, f16([0.125, 0.5]) + pack_bits([7, -7, 3, 0, -1], 4)],
    [b"", f16(GOLDEN_F16)],
    [b"", f16([1.0, 0.0625, 2.0]) + pack_bits([3, -3, 2, -2, 1, -1, 0], 3)],
]


@dataclass
class RawPacket:
    """Every field of a v1 packet as plain values; ``None`` lengths are computed."""

    magic: bytes = b"SLRP"
    version: int = 1
    flags: int = 0
    fingerprint: bytes = hashlib.sha256(b"solar-edge golden bundle").digest()
    adapter_id: bytes = b"golden-task.v1"
    adapter_id_len: int | None = None
    adapter_version: int = 7
    prng: int = 1
    perturbation: int = 1
    seed: int = 0x0123456789ABCDEF
    metadata: bytes = GOLDEN_METADATA
    metadata_len: int | None = None
    layer_count: int | None = None
    body_length: int | None = None
    entries: list[list] = field(default_factory=lambda: [list(e) for e in GOLDEN_ENTRIES])
    payloads: list[list[bytes]] = field(default_factory=lambda: [list(p) for p in GOLDEN_PAYLOADS])
    body: bytes | None = None  # replaces table + payload when given
    key_id: bytes | None = None

    def header(self, body_len: int) -> bytes:
        return b"".join([
            self.magic, struct.pack("<HH", self.version, self.flags), self.fingerprint,
            struct.pack("<B", len(self.adapter_id) if self.adapter_id_len is None
                        else self.adapter_id_len),
            self.adapter_id,
            struct.pack("<QBBQ", self.adapter_version, self.prng, self.perturbation, self.seed),
            struct.pack("<H", len(self.metadata) if self.metadata_len is None
                        else self.metadata_len),
            self.metadata,
            struct.pack("<H", len(self.entries) if self.layer_count is None else self.layer_count),
            struct.pack("<I", body_len if self.body_length is None else self.body_length),
        ])

    def table_and_payload(self) -> bytes:
        return b"".join(entry(*e) for e in self.entries) + b"".join(
            b"".join(p) for p in self.payloads)

    def build(self, key: Ed25519PrivateKey | None = None) -> bytes:
        key = key or golden_key()
        body = self.table_and_payload() if self.body is None else self.body
        kid = self.key_id
        if kid is None:
            kid = hashlib.sha256(key.public_key().public_bytes_raw()).digest()[:8]
        signed = self.header(len(body)) + body + kid
        return signed + key.sign(signed)

    def with_(self, **changes: object) -> RawPacket:
        return replace(self, **changes)
