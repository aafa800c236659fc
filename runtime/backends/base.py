"""What the runtime needs from an inference backend: four steps and the graph's inputs.

``prepare(patches)`` (one :class:`~solar_edge.runtime.patching.LayerPatch` per changed
layer) computes everything an adapter needs into new buffers (nothing the
serving model sees changes); ``probe(staged, feeds)`` runs the staged adapter without
serving it; ``commit(staged)`` makes it serve; ``run(feeds)`` infers with what serves.
``staged_patches(staged)`` reads back the patches a staged adapter will serve as they are
(the ``lora`` slot feeds, the adapter file ``lora-native`` loaded), or None where the
backend serves something it computed from them (merged weights, a patched flatbuffer).
``check_link(feeds)`` raises :class:`~solar_edge.errors.ProfileError` when patching would
not be seen (e.g. weights copied to an accelerator). Feeds are keyed by the graph's input
names (``input_names``), whatever the backend calls them inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from solar_edge.runtime.patching import Patches

Feeds = Mapping[str, np.ndarray]


class Backend(Protocol):
    name: str                      # the patching mechanism it serves with
    fixed_seq_len: int | None      # static-shape graphs pad token inputs to this length

    def input_names(self) -> list[str]:
        """Graph inputs a model family feeds (not the weights or LoRA slots)."""
        ...

    def prepare(self, patches: Patches) -> Any: ...

    def probe(self, staged: Any, feeds: Feeds) -> list[np.ndarray]: ...

    def staged_patches(self, staged: Any) -> Patches | None: ...

    def commit(self, staged: Any) -> None: ...

    def run(self, feeds: Feeds) -> list[np.ndarray]: ...

    def check_link(self, feeds: Feeds) -> None: ...
