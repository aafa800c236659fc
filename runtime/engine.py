"""``EdgeRuntime``: verify a packet, decode it, and swap the adapter in atomically.

The flow of :meth:`EdgeRuntime.apply`: packet bytes -> signature against the trusted keys
(``solar_edge.format.packet``) -> base fingerprint -> anti-rollback version -> low-rank factors per
layer (``solar_edge.encode.solar.decode_factors``, which regenerates only the perturbed basis
columns the packet keeps) -> the backend stages the adapter in new buffers -> health check
(fixed input, finite outputs) -> commit. Any failure leaves the previous adapter serving.

The cache keeps each adapter's factors ``(L, Rt)`` only: ``4 * (out + in) * k`` bytes per
adapted weight, never a dense ``dW``. Base weights are the bundle's memory-mapped arrays and
are only read, so switching never accumulates error.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from solar_edge.errors import (
    BaseMismatchError,
    HealthCheckError,
    RollbackError,
    RuntimeApplyError,
    SolarEdgeError,
    UnknownAdapterError,
)
from solar_edge.format import signing
from solar_edge.format.packet import Packet, PacketLimits
from solar_edge.format.reader import decode_packet
from solar_edge.regen.heads import head_logits, mean_pool, task_head
from solar_edge.runtime.bundle_parts import BundleParts, open_bundle
from solar_edge.runtime.patching import Factors, check_factors, factors_nbytes

HEALTH_TEXT = "solar-edge health check: the quick brown fox jumps over the lazy dog."


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    version: int
    metadata: dict[str, Any]
    layers: int            # adapted weights
    rank: int              # largest k over layers
    cache_bytes: int       # memory the cached factors take

    @property
    def labels(self) -> list[str] | None:
        labels = self.metadata.get("labels")
        return list(labels) if labels else None


@dataclass
class _Cached:
    info: AdapterInfo
    factors: dict[int, Factors]
    head: np.ndarray | None = field(default=None)


class EdgeRuntime:
    """Serve a bundle's model, patched with signed adapter packets.

    ``trusted_keys``: Ed25519 public keys (iterable or ``{key id: key}``).
    ``profile``: a device-profile name, ``DeviceProfile`` or mapping; default: the bundle's.
    ``mechanism``: a name from ``MECHANISMS`` or ``"tflite"``; default per profile.
    ``min_versions``: versions the caller already installed (e.g. the agent's persisted
    state): a packet older than that is a rollback; the same version may be re-applied once
    after a restart. Within one runtime, an adapter id only accepts newer versions.
    """

    def __init__(
        self,
        bundle_dir: str,
        trusted_keys: signing.TrustedKeys,
        profile: Any = None,
        mechanism: str | None = None,
        *,
        min_versions: Mapping[str, int] | None = None,
        max_cached: int = 8,
        threads: int = 0,
        limits: PacketLimits = PacketLimits(),  # noqa: B008 (frozen)
    ) -> None:
        self.keys = signing.keyring(trusted_keys)
        if not self.keys:
            raise SolarEdgeError("no trusted keys: the runtime would accept no packet")
        self.bundle: BundleParts = open_bundle(bundle_dir, profile)
        self.limits = limits
        self.max_cached = max_cached
        self.backend, self.mechanism = self._open_backend(mechanism, threads)
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._floor = dict(min_versions or {})
        self._installed: dict[str, int] = {}
        self._active: _Cached | None = None
        self.last_timings: dict[str, float] = {}  # of the last apply/switch/reset, by step
        self._health_feeds = self.backend.encode([HEALTH_TEXT])
        self.backend.check_link(self._health_feeds)
        first = self.backend.run(self._health_feeds)
        self._check(first)
        self.hidden = int(first[0].shape[-1])  # width of the pooled embedding (task heads)

    def _open_backend(self, mechanism: str | None, threads: int) -> tuple[Any, str]:
        from solar_edge.runtime.backends import open_backend

        return open_backend(self.bundle, mechanism, threads)

    # --- state -------------------------------------------------------------------------
    @property
    def active(self) -> AdapterInfo | None:
        return self._active.info if self._active else None

    @property
    def cached(self) -> list[AdapterInfo]:
        return [c.info for c in self._cache.values()]

    @property
    def installed_versions(self) -> dict[str, int]:
        """Highest version applied per adapter id (for the caller to persist)."""
        return {**self._floor, **self._installed}

    # --- apply / switch / reset ----------------------------------------------------------
    def apply(self, packet_bytes: bytes) -> AdapterInfo:
        """Verify, decode, cache and activate a packet; atomic (see module docstring)."""
        t0 = time.perf_counter()
        packet = decode_packet(packet_bytes, self.keys, self.limits)
        header = packet.header
        if header.fingerprint != self.bundle.fingerprint:
            raise BaseMismatchError(
                f"packet is for bundle {header.fingerprint.hex()[:16]}..., this runtime serves "
                f"{self.bundle.fingerprint.hex()[:16]}...", field="header.fingerprint")
        self._check_version(header.adapter_id, header.adapter_version)
        t1 = time.perf_counter()
        cached = self._decode(packet)
        t2 = time.perf_counter()
        with self._lock:
            self._activate(cached)
            self.last_timings = {"verify_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3,
                                 **self.last_timings}
            self._installed[header.adapter_id] = header.adapter_version
            self._cache[header.adapter_id] = cached
            self._cache.move_to_end(header.adapter_id)
            while len(self._cache) > self.max_cached:
                oldest = next(iter(self._cache))
                if self._active is self._cache[oldest]:
                    self._cache.move_to_end(oldest)
                    continue
                del self._cache[oldest]
        return cached.info

    def switch(self, adapter_id: str) -> AdapterInfo:
        """Serve a cached adapter (recomputed from its factors and the pristine base)."""
        with self._lock:
            cached = self._cache.get(adapter_id)
            if cached is None:
                raise UnknownAdapterError(
                    f"adapter {adapter_id!r} is not cached; cached: {list(self._cache)}")
            self._activate(cached, check=False)
            self._cache.move_to_end(adapter_id)
            return cached.info

    def reset(self) -> None:
        """Serve the base model."""
        with self._lock:
            self._activate(None, check=False)

    # --- inference -----------------------------------------------------------------------
    def infer(self, inputs: Sequence[str] | str | Mapping[str, np.ndarray]) -> np.ndarray:
        """Texts -> normalised mean-pooled embeddings, or task logits when a head is active.

        A mapping of arrays is fed to the graph as is and returns its first output.
        """
        with self._lock:
            if isinstance(inputs, Mapping):
                return self.backend.run(dict(inputs))[0]
            feeds = self.backend.encode([inputs] if isinstance(inputs, str) else list(inputs))
            hidden = self.backend.run(feeds)[0]
            head = self._active.head if self._active else None
        pooled = mean_pool(hidden, feeds["attention_mask"])
        if head is not None:
            return head_logits(pooled, head)
        norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
        return (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32)

    def classify(self, texts: Sequence[str] | str) -> list[str]:
        """Labels from the active adapter's task head."""
        info = self.active
        if info is None or info.labels is None or self._active is None or \
                self._active.head is None:
            raise SolarEdgeError("the active adapter has no task head")
        logits = self.infer(texts)
        return [info.labels[i] for i in logits.argmax(axis=-1)]

    # --- internals -----------------------------------------------------------------------
    def _check_version(self, adapter_id: str, version: int) -> None:
        installed = self._installed.get(adapter_id)
        if installed is not None and version <= installed:
            raise RollbackError(
                f"adapter {adapter_id!r} version {version} is not newer than installed "
                f"{installed}", field="header.adapter_version")
        floor = self._floor.get(adapter_id)
        if floor is not None and version < floor:
            raise RollbackError(
                f"adapter {adapter_id!r} version {version} is older than installed {floor}",
                field="header.adapter_version")

    def _decode(self, packet: Packet) -> _Cached:
        from solar_edge.decode import decode_records

        try:
            decoded = decode_records(packet.records, packet.codec, self.bundle.dims,
                                     self.bundle.basis)
        except SolarEdgeError as exc:
            raise RuntimeApplyError(f"cannot decode the packet: {exc}") from exc
        factors = {lid: check_factors(lid, self.bundle.slots[lid].shape, pair)
                   for lid, pair in decoded.items()}
        meta = dict(packet.header.metadata)
        head = None
        if meta.get("labels") and "head_seed" in meta:
            head = task_head(int(meta["head_seed"]), len(meta["labels"]), self.hidden)
        info = AdapterInfo(
            adapter_id=packet.header.adapter_id, version=packet.header.adapter_version,
            metadata=meta, layers=len(factors),
            rank=max((f[0].shape[1] for f in factors.values()), default=0),
            cache_bytes=factors_nbytes(factors),
        )
        return _Cached(info, factors, head)

    def _check(self, outputs: Sequence[np.ndarray]) -> None:
        if not outputs or any(not np.isfinite(o).all() for o in outputs):
            raise HealthCheckError("health check: the model produced non-finite outputs")

    def _activate(self, new: _Cached | None, check: bool = True) -> None:
        """Stage, check, commit; on any failure restore what served before and re-raise.

        ``check=False`` (switch, reset) skips the health check: a cached adapter passed it
        when applied and the base is the bundle's own model.
        """
        factors = new.factors if new else {}
        t0 = time.perf_counter()
        try:
            staged = self.backend.prepare(factors)
            t1 = time.perf_counter()
            probe = self.backend.probe(staged, self._health_feeds) if check else None
        except SolarEdgeError:
            raise
        except Exception as exc:
            raise RuntimeApplyError(f"staging the adapter failed: {exc}") from exc
        if probe is not None:
            self._check(probe)  # nothing committed yet
        try:
            self.backend.commit(staged)
            if check and probe is None:
                self._check(self.backend.run(self._health_feeds))
        except Exception as exc:
            previous = self._active.factors if self._active else {}
            self.backend.commit(self.backend.prepare(previous))
            if isinstance(exc, SolarEdgeError):
                raise
            raise RuntimeApplyError(f"activating the adapter failed: {exc}") from exc
        self._active = new
        t2 = time.perf_counter()
        self.last_timings = {"stage_ms": (t1 - t0) * 1e3, "check_and_commit_ms": (t2 - t1) * 1e3}
