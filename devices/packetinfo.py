"""What the delivery side needs to know about a packet: adapter id, version, base, size, hash.

Read from the packet itself through ``solar_edge.format.packet.decode_packet`` (which checks every
field and, given trusted keys, the Ed25519 signature), so the repository metadata can never
claim something the signed packet does not say.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PacketFacts:
    adapter_id: str
    version: int
    fingerprint: str   # hex SHA-256 of the base bundle the packet was made for
    size: int
    sha256: str


FactsReader = Callable[[bytes], PacketFacts]


def _field(obj: Any, *names: str) -> Any:
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    raise AttributeError(f"packet header has none of {names}")


def read_facts(data: bytes, trusted_keys: Any = None) -> PacketFacts:
    """Decode ``data`` as a SOLAR packet (PacketError subclasses on bad input)."""
    from solar_edge.format.reader import decode_packet

    header = decode_packet(data, trusted_keys=trusted_keys).header
    fingerprint = _field(header, "fingerprint", "bundle_fingerprint", "base_fingerprint")
    if isinstance(fingerprint, bytes):
        fingerprint = fingerprint.hex()
    return PacketFacts(
        adapter_id=str(_field(header, "adapter_id")),
        version=int(_field(header, "adapter_version", "version")),
        fingerprint=str(fingerprint),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
