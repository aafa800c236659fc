"""Test doubles for the OTA agent, named as such: a stand-in packet format and runtime.

``make_test_packet`` writes a tiny Ed25519-signed stand-in for a SOLAR packet (magic,
JSON header, signature), and :class:`InMemoryApplier` plays the runtime contract on it:
signature check, base-fingerprint check, per-id version check, a "model" whose output
is ``x * scale`` of the active adapter. They exist so the agent's state machine can be
tested on the real server and client without the real runtime; the integration tests
(test_agent_runtime.py) use real packets and EdgeRuntime.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from solar_edge.devices.packetinfo import PacketFacts
from solar_edge.errors import (
    BadMagicError,
    BaseMismatchError,
    HealthCheckError,
    RollbackError,
    SignatureError,
    UnknownAdapterError,
)

MAGIC = b"TESTPKT1"
BASE = "b" * 64


def make_test_packet(key: Ed25519PrivateKey, adapter_id: str, version: int,
                     scale: float = 1.0, fingerprint: str = BASE, pad: int = 0) -> bytes:
    """A signed stand-in packet; ``pad`` adds bytes so downloads span several chunks."""
    header = json.dumps({"adapter_id": adapter_id, "version": version, "scale": scale,
                         "fingerprint": fingerprint, "pad": "x" * pad}).encode()
    body = MAGIC + len(header).to_bytes(4, "little") + header
    return body + key.sign(body)


def parse_test_packet(data: bytes, trusted: Ed25519PublicKey | None) -> dict:
    if not data.startswith(MAGIC):
        raise BadMagicError("not a test packet", field="magic")
    body, sig = data[:-64], data[-64:]
    if trusted is not None:
        try:
            trusted.verify(sig, body)
        except InvalidSignature as exc:
            raise SignatureError("signature does not verify", field="signature") from exc
    n = int.from_bytes(body[8:12], "little")
    return json.loads(body[12:12 + n])


def double_facts(data: bytes) -> PacketFacts:
    head = parse_test_packet(data, None)
    return PacketFacts(head["adapter_id"], head["version"], head["fingerprint"], len(data),
                       hashlib.sha256(data).hexdigest())


class InMemoryApplier:
    """In-memory double of the runtime behind the agent's Applier protocol.

    ``cache`` holds staged adapters by id; ``serving`` is the header of what serves (a
    newer staged version of the serving id does not serve until it is activated)."""

    def __init__(self, trusted: Ed25519PublicKey, fingerprint: str = BASE) -> None:
        self.trusted = trusted
        self.fingerprint = fingerprint
        self.cache: dict[str, dict] = {}
        self.serving: dict | None = None
        self.staged: list[str] = []   # sha256 of every packet staged, in order

    def stage(self, data: bytes) -> PacketFacts:
        head = parse_test_packet(data, self.trusted)
        if head["fingerprint"] != self.fingerprint:
            raise BaseMismatchError("packet is for another base bundle", field="header.fingerprint")
        cached = self.cache.get(head["adapter_id"])
        if cached is not None and head["version"] <= cached["version"]:
            raise RollbackError("not newer than the cached version", field="header.version")
        if not math.isfinite(head["scale"]):  # the health probe of the staged adapter
            raise HealthCheckError("non-finite outputs")
        self.cache[head["adapter_id"]] = head
        self.staged.append(hashlib.sha256(data).hexdigest())
        return double_facts(data)

    def activate(self, adapter_id: str | None) -> None:
        if adapter_id is not None and adapter_id not in self.cache:
            raise UnknownAdapterError(adapter_id)
        self.serving = None if adapter_id is None else self.cache[adapter_id]

    @property
    def active(self) -> str | None:
        return None if self.serving is None else self.serving["adapter_id"]

    def infer(self, x: Sequence[float]) -> np.ndarray:
        scale = 1.0 if self.serving is None else self.serving["scale"]
        return np.asarray(x, np.float64) * scale

    def restore(self, packets: Sequence[bytes], active: str | None) -> None:
        self.cache, self.serving = {}, None
        for data in packets:
            self.stage(data)
        self.activate(active)

    @property
    def active_version(self) -> int | None:
        return None if self.serving is None else self.serving["version"]
