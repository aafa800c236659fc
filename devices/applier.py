"""What the update agent needs from a runtime, as a small protocol, and its real implementation.

The agent only ever talks to an :class:`Applier`; unit tests pass an in-memory double,
integration tests and the CLI pass :class:`RuntimeApplier` around
``solar_edge.runtime.EdgeRuntime`` (docs/architecture.md, runtime contract).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from solar_edge.devices.packetinfo import PacketFacts, read_facts
from solar_edge.errors import HealthCheckError

HEALTH_PROBE = ("solar-edge health probe: the quick brown fox jumps over the lazy dog",)


class Applier(Protocol):
    def inspect(self, data: bytes) -> PacketFacts:
        """Decode and verify the packet's own signature; PacketError subclasses on failure."""
        ...

    def apply(self, data: bytes) -> None:
        """Verify, decode and cache the adapter atomically (does not change the active one
        unless nothing is active); PacketError/RuntimeApplyError subclasses on failure."""
        ...

    def activate(self, adapter_id: str | None) -> None:
        """Serve ``adapter_id`` (``None``: the base model)."""
        ...

    def health_check(self) -> None:
        """Run a fixed input through the active model; HealthCheckError unless finite."""
        ...

    def restore(self, packets: Sequence[bytes], active: str | None) -> None:
        """Rebuild the cached adapters from exactly these packets and activate ``active``
        (start-up after a reboot or crash, and rollback after a failed health check)."""
        ...


class RuntimeApplier:
    """:class:`Applier` over a real ``EdgeRuntime``; ``make_runtime`` builds a fresh one."""

    def __init__(self, make_runtime: Callable[[], Any], trusted_keys: Any,
                 probe: Sequence[Any] = HEALTH_PROBE) -> None:
        self.make_runtime = make_runtime
        self.trusted_keys = trusted_keys
        self.probe = list(probe)
        self.runtime = make_runtime()

    def inspect(self, data: bytes) -> PacketFacts:
        return read_facts(data, self.trusted_keys)

    def apply(self, data: bytes) -> None:
        previous = self.runtime.active
        self.runtime.apply(data)
        # apply() activates what it installs; the agent decides what serves.
        if previous is None:
            return
        self.runtime.switch(previous.adapter_id)

    def activate(self, adapter_id: str | None) -> None:
        if adapter_id is None:
            self.runtime.reset()
        else:
            self.runtime.switch(adapter_id)

    def health_check(self) -> None:
        try:
            out = np.asarray(self.runtime.infer(self.probe))
        except Exception as exc:  # noqa: BLE001 - any failure of the patched model is unhealthy
            raise HealthCheckError(f"health probe failed: {type(exc).__name__}: {exc}") from exc
        if out.size == 0 or not np.all(np.isfinite(out)):
            raise HealthCheckError("health probe produced empty or non-finite outputs")

    def restore(self, packets: Sequence[bytes], active: str | None) -> None:
        # A runtime that never cached anything is as fresh as a new one (saves a session).
        fresh = self.runtime if not self.runtime.cached else self.make_runtime()
        for data in packets:
            fresh.apply(data)
        self.runtime = fresh
        self.activate(active)

    def infer(self, inputs: Any) -> np.ndarray:
        return np.asarray(self.runtime.infer(inputs))
