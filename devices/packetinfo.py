"""What the delivery side needs to know about a packet: adapter id, version, base, size, hash.

Read from the packet itself through ``solar_edge.format.reader.decode_packet`` (which checks every
field and, given trusted keys, the Ed25519 signature), so the repository metadata can never
claim something the signed packet does not say. :func:`listed_target` checks what the
repository metadata says about a packet before the agent uses any of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from solar_edge.devices.rollout import parse_fraction
from solar_edge.devices.state import is_sha256_hex, is_version
from solar_edge.errors import RepositoryError
from solar_edge.format.ids import ID_RULE, is_valid_id
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


@dataclass(frozen=True)
class ListedTarget:
    """A target from verified repository metadata, every value checked before it is used.

    The repository key is trusted to list packets, not to choose file names: the hash and
    the adapter id end up in the partial file's name and the download URL, so they are
    checked here (64 lowercase hex digits; the id rule; the path the publisher writes)."""

    path: str
    adapter_id: str
    version: int
    sha256: str
    length: int
    rollout: float


def listed_target(path: str, info: Any) -> ListedTarget:
    """Check one ``TargetFile`` of the signed targets metadata; RepositoryError if unsafe."""
    custom = info.custom if isinstance(getattr(info, "custom", None), dict) else {}
    adapter_id, version = custom.get("adapter_id"), custom.get("version")
    if not is_valid_id(adapter_id):
        raise RepositoryError(f"target {path!r:.80}: adapter id {adapter_id!r:.80} does not "
                              f"follow the id rule ({ID_RULE})")
    if not is_version(version):
        raise RepositoryError(f"target {path!r:.80}: version {version!r:.40} is not an integer "
                              f"in 1..2^64-2")
    if path != f"adapters/{adapter_id}/v{version}.slr":
        raise RepositoryError(f"target {path!r:.80} is not named adapters/{adapter_id}/"
                              f"v{version}.slr as its custom info says")
    hashes = info.hashes if isinstance(info.hashes, dict) else {}
    sha = hashes.get("sha256")
    if not is_sha256_hex(sha):
        listed = ", ".join(f"{k}={v!r:.20}" for k, v in hashes.items())
        raise RepositoryError(f"target {path!r:.80}: needs a sha256 of 64 lowercase hex digits, "
                              f"metadata lists {listed or 'none'}")
    if type(info.length) is not int or info.length < 1:
        raise RepositoryError(f"target {path!r:.80}: length {info.length!r:.40} is not positive")
    return ListedTarget(path, str(adapter_id), int(str(version)), str(sha), info.length,
                        parse_fraction(custom.get("rollout")))
