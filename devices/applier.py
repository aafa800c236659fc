"""What the update agent needs from a runtime, as a small protocol, and its real implementation.

The agent only ever talks to an :class:`Applier`; unit tests pass an in-memory double,
integration tests and the CLI pass :class:`RuntimeApplier` around
``solar_edge.runtime.engine.EdgeRuntime``. One install is one :meth:`Applier.stage` (the
packet's one verification, decode and health probe) and at most one :meth:`Applier.activate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from solar_edge.devices.packetinfo import PacketFacts


class Applier(Protocol):
    def stage(self, data: bytes) -> PacketFacts:
        """Verify, decode and health-probe the packet, and cache its adapter; what serves does
        not change. PacketError / RuntimeApplyError (HealthCheckError) subclasses on failure."""
        ...

    def activate(self, adapter_id: str | None) -> None:
        """Serve ``adapter_id`` (``None``: the base model)."""
        ...

    def restore(self, packets: Sequence[bytes], active: str | None) -> None:
        """Rebuild the cached adapters from exactly these packets and activate ``active``
        (start-up after a reboot or crash, and rollback after a failed install)."""
        ...


class RuntimeApplier:
    """:class:`Applier` over a real ``EdgeRuntime``; ``make_runtime`` builds a fresh one."""

    def __init__(self, make_runtime: Callable[[], Any]) -> None:
        self.make_runtime = make_runtime
        self.runtime = make_runtime()

    @property
    def trust_tag(self) -> str:
        """Short digest of the trusted packet key ids: a cached rejection is only reused
        under the same keys (adding a trusted key re-checks it)."""
        ids = "\n".join(sorted(k.hex() for k in self.runtime.keys))
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

    def stage(self, data: bytes) -> PacketFacts:
        info = self.runtime.stage(data)
        return PacketFacts(info.adapter_id, info.version, self.runtime.bundle.fingerprint.hex(),
                           len(data), hashlib.sha256(data).hexdigest())

    def activate(self, adapter_id: str | None) -> None:
        self.runtime.activate(adapter_id)

    def restore(self, packets: Sequence[bytes], active: str | None) -> None:
        # A runtime that never cached anything is as fresh as a new one (saves a session).
        fresh = self.runtime if not self.runtime.cached else self.make_runtime()
        for data in packets:
            fresh.stage(data)
        fresh.activate(active)
        self.runtime = fresh

    def infer(self, inputs: Any) -> np.ndarray:
        return np.asarray(self.runtime.infer(inputs))
