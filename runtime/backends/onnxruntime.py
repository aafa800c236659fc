"""onnxruntime backend: one class per patching mechanism, all with the same four steps.

``prepare(patches)`` (one :class:`~solar_edge.runtime.patching.LayerPatch` per changed
layer: factors, bias delta, DoRA row scale) computes everything an adapter needs into new
buffers (nothing the serving session sees changes); ``probe(staged, feeds)`` runs the staged
adapter before it serves; ``commit(staged)`` makes it serve; ``run(feeds)`` infers.
Mechanisms and the graph variant each needs (``docs/runtime.md``):

* ``initializer``: base graph; patched weights live in our numpy buffers handed to ORT with
  ``SessionOptions.add_initializer`` (prepacking off, so ORT reads them in place); commit
  copies the staged weights into those buffers.
* ``iobinding``: graph with the weights also listed as inputs; staged weights are bound with
  IOBinding (``OrtValue`` sharing numpy memory); commit swaps the bound set.
* ``lora`` / ``lora-native``: graph with ``y += (x @ A) @ B`` slots; the update is served
  unmerged as plain feeds or as an ORT ``LoraAdapter`` activated per run. Where the bundle
  has ``lora-plain`` (slots without the DoRA-scale and bias nodes: decoders, ViTs), both serve
  packets that need neither on it, open the full graph only for a packet that does, and on
  CPU ``lora-native`` is the default (docs/decoder.md measures why).
* ``recreate``: base graph; a new session with merged initializers replaces the old one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from solar_edge.errors import ProfileError, RuntimeApplyError
from solar_edge.runtime.backends.providers import default_mechanism, select_providers
from solar_edge.runtime.bundle_parts import BundleParts
from solar_edge.runtime.patching import (
    LayerPatch,
    Patches,
    WeightSlot,
    lora_feeds,
    patched_bias,
    patched_weight_t,
    slot_patches,
)

MECHANISMS = ("initializer", "iobinding", "lora", "lora-native", "recreate")
# Graph variant (manifest ``onnx.variants`` key) each mechanism needs; None: the base graph.
GRAPH_VARIANT: dict[str, str | None] = {
    "initializer": None,
    "recreate": None,
    "iobinding": "inputs",
    "lora": "lora",
    "lora-native": "lora",
}

Feeds = Mapping[str, np.ndarray]


def session_options(*, prepacking: bool = True, threads: int = 0) -> ort.SessionOptions:
    """ORT_ENABLE_ALL keeps the weight link on these graphs (measured: docs/runtime.md)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


class OrtMechanism:
    """Shared state: graph path, adaptable slots, pristine base weights, providers."""

    name = ""
    fixed_seq_len: int | None = None  # dynamic batch and sequence axes

    def __init__(
        self,
        model_path: str,
        slots: Sequence[WeightSlot],
        base_weights: Mapping[int, np.ndarray],
        providers: Sequence[str],
        *,
        threads: int = 0,
        base_biases: Mapping[int, np.ndarray | None] | None = None,
    ) -> None:
        self.model_path = model_path
        self.slots = {s.layer_id: s for s in slots}
        self.base = base_weights
        self.base_bias = base_biases or {}
        self._b0: dict[int, np.ndarray | None] = {}  # base biases, opened once per layer
        self.providers = list(providers)
        self.threads = threads
        self.session = self._create()

    def _create(self) -> ort.InferenceSession:
        return ort.InferenceSession(
            self.model_path, session_options(threads=self.threads), providers=self.providers
        )

    def _buffers(self, lid: int, patch: LayerPatch | None) -> dict[str, np.ndarray]:
        """The merged weight (and bias) of one layer, by initializer name."""
        slot = self.slots[lid]
        out = {slot.init_name: patched_weight_t(self.base[lid], patch)}
        if slot.bias_name is not None:
            if lid not in self._b0:
                self._b0[lid] = self.base_bias.get(lid)
            b0 = self._b0[lid]
            if b0 is None:
                raise RuntimeApplyError(f"layer {lid}: no base bias for {slot.bias_name}")
            out[slot.bias_name] = patched_bias(b0, patch)
        elif patch is not None and patch.bias is not None:
            raise RuntimeApplyError(f"layer {lid}: the packet changes a bias this bundle's "
                                    "graph cannot patch")
        return out

    def _merged(self, patches: Mapping[int, LayerPatch | None]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for lid, patch in patches.items():
            out.update(self._buffers(lid, patch))
        return out

    def input_names(self) -> list[str]:
        """Graph inputs that are not weights, biases or LoRA slots (input_ids, ...)."""
        names = {s.init_name for s in self.slots.values()}
        names |= {s.bias_name for s in self.slots.values() if s.bias_name}
        return [i.name for i in self.session.get_inputs()
                if i.name not in names and not i.name.startswith(tuple(names))]

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    # the four steps -----------------------------------------------------------------------
    def prepare(self, patches: Patches) -> Any:
        raise NotImplementedError

    def probe(self, staged: Any, feeds: Feeds) -> list[np.ndarray]:
        raise NotImplementedError

    def commit(self, staged: Any) -> None:
        raise NotImplementedError

    def staged_patches(self, staged: Any) -> Patches | None:
        return None  # the merged mechanisms serve weights computed on the board

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        return self.session.run(None, dict(feeds))

    def check_link(self, feeds: Feeds) -> None:
        """Raise ProfileError if patching is not seen by the session (e.g. a device EP)."""


class InitializerMechanism(OrtMechanism):
    """Weights (and biases) in our buffers via ``add_initializer``; commit copies staged ->
    live in place."""

    name = "initializer"

    def _create(self) -> ort.InferenceSession:
        self.live = self._merged({lid: None for lid in self.slots})
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in self.live.items()}
        so = session_options(prepacking=False, threads=self.threads)
        for name, value in self._values.items():
            so.add_initializer(name, value)
        self.adapted: set[int] = set()
        return ort.InferenceSession(self.model_path, so, providers=self.providers)

    def prepare(self, patches: Patches) -> tuple[dict[str, np.ndarray], set[int]]:
        """New buffers for every layer the new or the serving adapter touches."""
        touched = sorted(set(patches) | self.adapted)
        bufs: dict[str, np.ndarray] = {}
        for lid in touched:
            bufs.update(self._buffers(lid, patches.get(lid)))
        return bufs, set(patches)

    def probe(self, staged: tuple[dict[str, np.ndarray], set[int]],
              feeds: Feeds) -> list[np.ndarray]:
        """The session reads only the live buffers: swap the staged ones in for one run and
        back (the runtime holds its lock, so no other inference sees them)."""
        bufs, _ = staged
        saved = {name: self.live[name].copy() for name in bufs}
        try:
            for name, buf in bufs.items():
                np.copyto(self.live[name], buf)
            return self.run(feeds)
        finally:
            for name, buf in saved.items():
                np.copyto(self.live[name], buf)

    def commit(self, staged: tuple[dict[str, np.ndarray], set[int]]) -> None:
        bufs, adapted = staged
        # until every copy is done any written layer may differ from base: a restore after a
        # failure half-way re-stages all of them
        by_name = {s.init_name: lid for lid, s in self.slots.items()}
        self.adapted = self.adapted | {by_name[n] for n in bufs if n in by_name}
        for name, buf in bufs.items():
            np.copyto(self.live[name], buf)
        self.adapted = adapted

    def check_link(self, feeds: Feeds) -> None:
        before = self.run(feeds)[0]
        weights = [s.init_name for s in self.slots.values()]
        for name in weights:
            self.live[name].fill(0.0)
        try:
            zeroed = self.run(feeds)[0]
        finally:
            for lid, slot in self.slots.items():
                patched_weight_t(self.base[lid], None, out=self.live[slot.init_name])
            self.adapted = set()
        if np.array_equal(before, zeroed):
            raise ProfileError(
                "mechanism 'initializer': the session does not read the patched buffers "
                f"(providers {self.providers}); use 'lora' or 'recreate' on this device"
            )


class IOBindingMechanism(OrtMechanism):
    """Weights as overridable graph inputs; staged buffers bound with IOBinding, then swapped."""

    name = "iobinding"

    def _create(self) -> ort.InferenceSession:
        self.current: dict[str, ort.OrtValue] = {}
        return super()._create()

    def prepare(self, patches: Patches) -> dict[str, Any]:
        return {name: (buf, ort.OrtValue.ortvalue_from_numpy(buf))
                for name, buf in self._merged(patches).items()}

    def _run_bound(self, weights: Mapping[str, Any], feeds: Feeds) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, (_, value) in weights.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names():
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def probe(self, staged: dict[str, Any], feeds: Feeds) -> list[np.ndarray]:
        return self._run_bound(staged, feeds)

    def commit(self, staged: dict[str, Any]) -> None:
        self.current = staged

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        return self._run_bound(self.current, feeds)


class LoraMechanism(OrtMechanism):
    """The low-rank update served unmerged through the graph's slots, as plain feeds; on the
    ``plain_path`` graph (no scale/bias slots) where given, until a packet needs those slots.
    From then on every adapter is served by the full graph and the plain session is let go:
    each session holds its own copy of the model's weights, and a board has room for one."""

    name = "lora"

    def __init__(self, *args: Any, plain_path: str | None = None, **kwargs: Any) -> None:
        self.plain_path = plain_path
        super().__init__(*args, **kwargs)

    def _create(self) -> ort.InferenceSession:
        self.current: dict[str, np.ndarray] = {}
        self._sessions: dict[str | None, ort.InferenceSession] = {}
        return self._session(self.plain_path)

    def _session(self, path: str | None) -> ort.InferenceSession:
        """The session of graph ``path`` (None: the full one), opened on first use; opening
        the full one forgets the plain one (it lives on only while it still serves)."""
        if path not in self._sessions:
            so = session_options(threads=self.threads)
            session = ort.InferenceSession(path or self.model_path, so,
                                           providers=self.providers)
            if path is None:
                self._sessions.clear()
            self._sessions[path] = session
        return self._sessions[path]

    def _feeds(self, patches: Patches) -> dict[str, np.ndarray]:
        return {name: value for lid, patch in patches.items()
                for name, value in lora_feeds(self.slots[lid].init_name, patch).items()}

    def _session_for(self, patches: Patches) -> ort.InferenceSession:
        plain = None not in self._sessions and all(
            p.scale is None and p.bias is None for p in patches.values())
        return self._session(self.plain_path if plain else None)

    def prepare(self, patches: Patches) -> Any:  # (session, slot feeds)
        return self._session_for(patches), self._feeds(patches)

    def probe(self, staged: Any, feeds: Feeds) -> list[np.ndarray]:
        return staged[0].run(None, {**feeds, **staged[1]})

    def staged_patches(self, staged: Any) -> Patches | None:
        """The patches the staged slot feeds serve, read back from the feeds themselves."""
        return slot_patches(self.slots.values(), staged[1])

    def commit(self, staged: Any) -> None:
        self.session, self.current = staged

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        return self.session.run(None, {**feeds, **self.current})


class LoraNativeMechanism(LoraMechanism):
    """Like ``lora`` but through ORT's own adapters (``.onnx_adapter`` + add_active_adapter)."""

    name = "lora-native"

    def _create(self) -> ort.InferenceSession:
        self._dir = tempfile.TemporaryDirectory(prefix="solar-edge-ort-adapters-")
        self._count = 0
        self.current_options: tuple[ort.RunOptions, Any] = (ort.RunOptions(), None)
        return super()._create()

    def prepare(self, patches: Patches) -> tuple[ort.RunOptions, Any, ort.InferenceSession,
                                                 dict[str, np.ndarray]]:
        feeds = self._feeds(patches)
        options, adapter, served = ort.RunOptions(), None, {}
        if feeds:
            fmt = ort.AdapterFormat()
            fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()})
            self._count += 1
            path = os.path.join(self._dir.name, f"{self._count}.onnx_adapter")
            fmt.export_adapter(path)
            adapter = ort.LoraAdapter()
            adapter.Load(path)
            # what the loaded adapter serves, read back from the file it mapped; copied
            # while the reader lives (its arrays are views into memory it frees)
            back = ort.AdapterFormat.read_adapter(path)
            served = {k: np.array(v.numpy(), copy=True)
                      for k, v in back.get_parameters().items()}
            del back
            options.add_active_adapter(adapter)
            os.unlink(path)  # memory-mapped already; POSIX keeps the pages
        # the adapter must outlive the options that name it
        return options, adapter, self._session_for(patches), served

    def probe(self, staged: tuple, feeds: Feeds) -> list[np.ndarray]:
        return staged[2].run(None, dict(feeds), staged[0])

    def staged_patches(self, staged: tuple) -> Patches | None:
        """The patches the staged adapter file serves, read back from that file."""
        return slot_patches(self.slots.values(), staged[3])

    def commit(self, staged: tuple) -> None:
        self.current_options, self.session = staged[:2], staged[2]

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        return self.session.run(None, dict(feeds), self.current_options[0])


class RecreateMechanism(OrtMechanism):
    """A new session with the merged weights as initializers replaces the serving one."""

    name = "recreate"

    def prepare(self, patches: Patches) -> tuple[ort.InferenceSession, list]:
        so = session_options(threads=self.threads)
        keep = []
        for name, buf in self._merged(patches).items():
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            keep.append((buf, value))
            so.add_initializer(name, value)
        return ort.InferenceSession(self.model_path, so, providers=self.providers), keep

    def probe(self, staged: tuple, feeds: Feeds) -> list[np.ndarray]:
        return staged[0].run(None, dict(feeds))

    def commit(self, staged: tuple) -> None:
        self.session, self._keep = staged


_CLASSES: dict[str, type[OrtMechanism]] = {
    c.name: c
    for c in (InitializerMechanism, IOBindingMechanism, LoraMechanism, LoraNativeMechanism,
              RecreateMechanism)
}


def open_backend(parts: BundleParts, mechanism: str | None, threads: int = 0) -> OrtMechanism:
    """The mechanism asked for, else the profile's default, on the graph variant it needs."""
    providers = select_providers(parts.profile)
    variants = frozenset(parts.bundle.manifest["onnx"].get("variants") or {})
    name = mechanism or default_mechanism(parts.profile, providers, variants)
    if name not in GRAPH_VARIANT:
        raise ProfileError(f"unknown onnxruntime patching mechanism {name!r}; known: "
                           f"{', '.join(MECHANISMS)}")
    path = parts.graph_path(GRAPH_VARIANT[name])
    plain = str(parts.graph_path("lora-plain")) \
        if name in ("lora", "lora-native") and "lora-plain" in variants else None
    return create_mechanism(name, str(path), list(parts.slots.values()), parts.base, providers,
                            threads=threads, base_biases=parts.base_biases, plain_path=plain)


def create_mechanism(
    name: str,
    model_path: str,
    slots: Sequence[WeightSlot],
    base_weights: Mapping[int, np.ndarray],
    providers: Sequence[str],
    *,
    threads: int = 0,
    base_biases: Mapping[int, np.ndarray | None] | None = None,
    plain_path: str | None = None,
) -> OrtMechanism:
    """Build mechanism ``name`` on the graph at ``model_path`` (the variant it needs);
    ``plain_path``: the ``lora-plain`` graph, which the ``lora`` mechanisms prefer."""
    if name not in _CLASSES:
        raise ProfileError(f"unknown patching mechanism {name!r}; known: {', '.join(MECHANISMS)}")
    extra: dict[str, Any] = {"plain_path": plain_path} if name.startswith("lora") else {}
    return _CLASSES[name](model_path, slots, base_weights, providers, threads=threads,
                          base_biases=base_biases, **extra)
