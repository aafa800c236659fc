"""What the delivery side needs to know about a packet: adapter id, version, base, size, hash.

Read from the packet itself through ``solar_edge.format.reader.decode_packet`` (which checks every
field and, given trusted keys, the Ed25519 signature), so the repository metadata can never
claim something the signed packet does not say.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from solar_edge.format.reader import decode_packet


@dataclass(frozen=True)
class PacketFacts:
    adapter_id: str
    version: int
    fingerprint: str   # hex SHA-256 of the base bundle the packet was made for
    size: int
    sha256: str


FactsReader = Callable[[bytes], PacketFacts]


def read_facts(data: bytes, trusted_keys: Any = None) -> PacketFacts:
    """Decode ``data`` as a SOLAR packet (PacketError subclasses on bad input)."""
    header = decode_packet(data, trusted_keys=trusted_keys).header
    return PacketFacts(adapter_id=header.adapter_id, version=header.adapter_version,
                       fingerprint=header.fingerprint.hex(), size=len(data),
                       sha256=hashlib.sha256(data).hexdigest())
