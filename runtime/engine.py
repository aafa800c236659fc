"""``EdgeRuntime``: verify a packet once, decode it once, stage it, and serve it on demand.

:meth:`EdgeRuntime.stage` is the one path a packet takes: bytes -> signature against the
trusted keys and every field checked (:func:`~solar_edge.format.reader.decode_packet`) ->
base fingerprint -> anti-rollback version (:meth:`_check_version`, the one place it is
checked) -> low-rank factors per layer (:func:`~solar_edge.decode.decode_records`, which
checks every record against the bundle before it regenerates anything) -> the backend
prepares the adapter in new buffers -> the checks its packet asks for, without serving it
(:mod:`solar_edge.runtime.checks`: an update or output digest, a forward pass with finite
outputs; else :class:`~solar_edge.errors.HealthCheckError`) -> cached. Nothing
that serves changes until :meth:`activate`, which commits in one step; :meth:`apply` is
both. Any failure leaves the previous adapter serving.

The cache keeps each adapter's patches only (:class:`~solar_edge.runtime.patching.LayerPatch`:
factors ``(L, Rt)``, ``4 * (out + in) * k`` bytes per adapted weight, and bias deltas and
DoRA row scales), never a dense ``dW``. Base weights are the bundle's memory-mapped arrays and
are only read, so switching never accumulates error. The model family
(:mod:`solar_edge.runtime.families`) turns inputs into feeds and outputs into features; the
backend (:mod:`solar_edge.runtime.backends`) runs the graph.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from solar_edge.decode import Decoded, decode_records
from solar_edge.errors import (
    BaseMismatchError,
    HealthCheckError,
    RollbackError,
    RuntimeApplyError,
    SolarEdgeError,
    UnknownAdapterError,
)
from solar_edge.format import signing
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.packet import Packet, PacketLimits
from solar_edge.format.reader import decode_packet
from solar_edge.runtime.backends import open_backend
from solar_edge.runtime.bundle_parts import open_bundle
from solar_edge.runtime.checks import StagingChecks, check_finite
from solar_edge.runtime.families import open_family
from solar_edge.runtime.heads import Head, embedding, head_from_packet
from solar_edge.runtime.patching import (
    LayerPatch,
    check_factors,
    dora_scale,
    one_blas_thread,
    patches_nbytes,
)


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
    patches: dict[int, LayerPatch]
    head: Head | None = None


class EdgeRuntime:
    """Serve a bundle's model, patched with signed adapter packets.

    ``trusted_keys``: Ed25519 public keys or public key files (a list, one key, or
    ``{key id: key}``).
    ``profile``: a device-profile name, ``DeviceProfile`` or mapping; default: the bundle's.
    ``mechanism``: a patching mechanism (:func:`solar_edge.runtime.backends.mechanisms`);
    default per profile. ``min_versions``: versions the caller already installed (e.g. the
    agent's persisted state): a packet older than that is a rollback; the same version may
    be re-applied once after a restart. Within one runtime an adapter id only accepts newer
    versions.
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
        self.bundle = open_bundle(bundle_dir, profile)
        self.limits = limits
        self.max_cached = max_cached
        self.backend = open_backend(self.bundle, mechanism, threads)
        self.mechanism = self.backend.name
        self.family = open_family(self.bundle, self.backend)
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._floor = dict(min_versions or {})
        self._installed: dict[str, int] = {}
        self._active: _Cached | None = None
        self._staged: tuple[_Cached, Any] | None = None  # prepared, probed, not yet served
        self._bases: dict[int, LayerBasis] = {}  # memory-mapped once per layer, then reused
        self.last_timings: dict[str, float] = {}  # of the last stage/activate, by step
        self._health_feeds = self.family.feeds(self.family.health_input)
        self.backend.check_link(self._health_feeds)
        first = self.backend.run(self._health_feeds)
        check_finite(first)
        hidden, _ = self.family.hidden(first, self._health_feeds)
        self.hidden = int(hidden.shape[-1])  # width of the hidden states (task heads)
        self.checks = StagingChecks(self.bundle, self.backend, self.family, self.hidden,
                                    self._health_feeds)

    # --- state -------------------------------------------------------------------------
    @property
    def active(self) -> AdapterInfo | None:
        return self._active.info if self._active else None

    @property
    def cached(self) -> list[AdapterInfo]:
        return [c.info for c in self._cache.values()]

    def update_digest(self, adapter_id: str) -> list[list[float]]:
        """The update digest of a cached adapter (what ``solar-edge compress`` signs into
        a packet's ``update_digest``, :mod:`solar_edge.regen.update_digest`)."""
        cached = self._cache.get(adapter_id)
        if cached is None:
            raise UnknownAdapterError(f"adapter {adapter_id!r} is not cached")
        return self.checks.update_digest(cached.patches, cached.head)

    @property
    def installed_versions(self) -> dict[str, int]:
        """Highest version staged per adapter id (for the caller to persist)."""
        return {**self._floor, **self._installed}

    # --- stage / activate ----------------------------------------------------------------
    def stage(self, packet_bytes: bytes) -> AdapterInfo:
        """Verify, decode, probe and cache a packet; what serves does not change."""
        t0 = time.perf_counter()
        packet = decode_packet(packet_bytes, self.keys, self.limits)
        header = packet.header
        if header.fingerprint != self.bundle.fingerprint:
            raise BaseMismatchError(
                f"packet is for bundle {header.fingerprint.hex()[:16]}..., this runtime serves "
                f"{self.bundle.fingerprint.hex()[:16]}...", field="header.fingerprint")
        self._check_version(header.adapter_id, header.adapter_version)
        t1 = time.perf_counter()
        with one_blas_thread():
            cached = self._decode(packet)
        t2 = time.perf_counter()
        with self._lock:
            try:
                with one_blas_thread():
                    staged = self.backend.prepare(cached.patches)
                t3 = time.perf_counter()
                self.checks.run(staged, cached.info.metadata, cached.patches, cached.head)
            except SolarEdgeError:
                raise
            except Exception as exc:
                raise RuntimeApplyError(f"staging the adapter failed: {exc}") from exc
            self._installed[header.adapter_id] = header.adapter_version
            # a newer version of the serving adapter replaces the cache entry; the old entry
            # keeps serving (it is self._active) until activate()
            self._cache[header.adapter_id] = cached
            self._cache.move_to_end(header.adapter_id)
            self._evict()
            self._staged = (cached, staged)  # valid until something else is committed
        self.last_timings = {"verify_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3,
                             "stage_ms": (t3 - t2) * 1e3,
                             "probe_ms": (time.perf_counter() - t3) * 1e3}
        return cached.info

    def activate(self, adapter_id: str | None) -> AdapterInfo | None:
        """Serve a cached adapter (``None``: the base model), committed in one step."""
        with self._lock:
            if adapter_id is None:
                new = None
            else:
                new = self._cache.get(adapter_id)
                if new is None:
                    raise UnknownAdapterError(
                        f"adapter {adapter_id!r} is not cached; cached: {list(self._cache)}")
            t0 = time.perf_counter()
            ready, self._staged = self._staged, None
            try:
                if ready is not None and new is not None and ready[0] is new:
                    staged = ready[1]  # prepared by stage() and nothing committed since
                else:
                    with one_blas_thread():
                        staged = self.backend.prepare(new.patches if new else {})
                t1 = time.perf_counter()
                self.backend.commit(staged)
            except Exception as exc:
                self._restore_serving()
                if isinstance(exc, SolarEdgeError):
                    raise
                raise RuntimeApplyError(f"activating the adapter failed: {exc}") from exc
            self._active = new
            if adapter_id is not None:
                self._cache.move_to_end(adapter_id)
            self.last_timings = {"prepare_ms": (t1 - t0) * 1e3,
                                 "commit_ms": (time.perf_counter() - t1) * 1e3}
            return new.info if new else None

    def apply(self, packet_bytes: bytes) -> AdapterInfo:
        """:meth:`stage` then :meth:`activate` the packet's adapter."""
        info = self.stage(packet_bytes)
        staged_timings = self.last_timings
        self.activate(info.adapter_id)
        self.last_timings = {**staged_timings, "commit_ms": self.last_timings["commit_ms"]}
        return info

    def switch(self, adapter_id: str) -> AdapterInfo:
        """Serve another cached adapter (recomputed from its factors and the pristine base)."""
        info = self.activate(adapter_id)
        assert info is not None
        return info

    def reset(self) -> None:
        """Serve the base model."""
        self.activate(None)

    # --- inference -----------------------------------------------------------------------
    def infer(self, inputs: Any) -> np.ndarray:
        """Inputs -> task logits when the active adapter has a head, else unit embeddings.

        A mapping of arrays is fed to the graph as is and returns its first output."""
        with self._lock:
            if isinstance(inputs, Mapping):
                try:
                    return self.backend.run(dict(inputs))[0]
                except Exception as exc:  # onnxruntime's own error types: names, shapes
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise RuntimeApplyError(f"the graph refused these inputs "
                                            f"({type(exc).__name__}: {first:.300})") from exc
            feeds = self.family.feeds(inputs)
            outputs = self.backend.run(feeds)
            head = self._active.head if self._active else None
        hidden, mask = self.family.hidden(outputs, feeds)
        return head.logits(hidden, mask) if head is not None else embedding(hidden, mask)

    def classify(self, inputs: Sequence[Any] | str) -> list[str]:
        """Labels from the active adapter's task head."""
        head = self._active.head if self._active else None
        if head is None:
            raise SolarEdgeError("the active adapter has no task head")
        logits = self.infer(inputs)
        return [head.labels[i] for i in logits.argmax(axis=-1)]

    def serving(self) -> threading.RLock:
        """Hold this (``with rt.serving():``) to keep the serving adapter for several runs."""
        return self._lock

    def run_graph(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Every graph output for ``feeds`` with the serving adapter (decoder steps)."""
        with self._lock:
            return self.backend.run(dict(feeds))

    def generate(self, prompt: Any, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, seed: int | None = None, on_token: Any = None,
                 stop_at_eos: bool = True) -> Any:
        """Continue a prompt with the serving adapter (decoder bundles; greedy at temperature
        0; see :func:`solar_edge.runtime.generation.generate`)."""
        from solar_edge.runtime.generation import Sampling, generate

        return generate(self, prompt, max_new_tokens, Sampling(temperature, top_k, seed),
                        on_token, stop_at_eos=stop_at_eos)

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
        try:
            decoded = decode_records(packet.records, packet.codec, self.bundle.dims,
                                     self._basis)
            meta = dict(packet.header.metadata)
            head = head_from_packet(meta, decoded.head, self.hidden, self.bundle.bundle.head_part)
        except SolarEdgeError as exc:
            raise RuntimeApplyError(f"cannot decode the packet: {exc}") from exc
        patches = self._patches(decoded)
        info = AdapterInfo(
            adapter_id=packet.header.adapter_id, version=packet.header.adapter_version,
            metadata=meta, layers=len(patches),
            rank=max((p.rank for p in patches.values()), default=0),
            cache_bytes=patches_nbytes(patches),
        )
        return _Cached(info, patches, head)

    def _basis(self, layer_id: int) -> LayerBasis:
        """The layer's basis maps, opened on first use and kept (pages stay mapped)."""
        basis = self._bases.get(layer_id)
        if basis is None:
            basis = self._bases[layer_id] = self.bundle.basis(layer_id)
        return basis

    def _patches(self, decoded: Decoded) -> dict[int, LayerPatch]:
        """Factors, bias deltas and DoRA row scales per layer (scales from the pristine W0)."""
        patches = {}
        for lid in sorted(set(decoded.factors) | set(decoded.biases) | set(decoded.magnitudes)):
            shape = self.bundle.slots[lid].shape
            factors = decoded.factors.get(lid)
            if factors is not None:
                factors = check_factors(lid, shape, factors)
            bias = decoded.biases.get(lid)
            if bias is not None and not np.isfinite(bias).all():
                raise HealthCheckError(f"layer {lid}: non-finite bias delta")
            scale = None
            if lid in decoded.magnitudes:
                scale = dora_scale(self.bundle.base[lid], factors, self.bundle.row_norms(lid),
                                   decoded.magnitudes[lid])
            patches[lid] = LayerPatch(factors, bias, scale)
        return patches

    def _evict(self) -> None:
        while len(self._cache) > self.max_cached:
            victim = next((k for k, c in self._cache.items()
                           if self._active is None or c is not self._active), None)
            if victim is None:
                return
            del self._cache[victim]

    def _restore_serving(self) -> None:
        """After a failed commit: put back exactly what served before."""
        previous = self._active.patches if self._active else {}
        self.backend.commit(self.backend.prepare(previous))
