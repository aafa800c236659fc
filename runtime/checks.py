"""What a staged adapter must pass before it serves, as its packet asks.

* ``canary`` in the metadata (the outputs vouch, :mod:`solar_edge.regen.canary`): one
  forward pass on the bundle's canary inputs, their digest checked against the packet's.
* ``update_digest`` (:mod:`solar_edge.regen.update_digest`): the digest of the update as
  staged checked against the packet's, with no forward pass. Where the backend serves the
  patches as they are (the ``lora`` slot feeds, or for ``lora-native`` the adapter file it
  loaded, read back by ``staged_patches``), that is the whole check unless an update is far
  larger than its base layer (:func:`~solar_edge.runtime.patching.within_growth`); where
  it serves something it computed from them (merged weights, a patched flatbuffer) the
  digest is of the decoded patches and a forward pass on the health input follows.
* neither: a forward pass on the health input.

Every forward pass must give finite outputs. Failures are
:class:`~solar_edge.errors.HealthCheckError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from solar_edge.errors import HealthCheckError
from solar_edge.regen import canary, update_digest
from solar_edge.regen.update_digest import LayerUpdate, ProbeCache
from solar_edge.runtime.heads import Head, embedding
from solar_edge.runtime.patching import LayerPatch, within_growth


def check_finite(outputs: Sequence[np.ndarray]) -> None:
    if not outputs or any(not np.isfinite(o).all() for o in outputs):
        raise HealthCheckError("health check: the model produced non-finite outputs")


class StagingChecks:
    """The checks of one runtime (its bundle, backend and model family), with the digest's
    probe vectors, reused across applies."""

    def __init__(self, bundle: Any, backend: Any, family: Any, hidden: int,
                 health_feeds: Mapping[str, np.ndarray]) -> None:
        self.bundle = bundle            # BundleParts
        self.backend = backend
        self.family = family
        self.hidden = hidden
        self.health_feeds = health_feeds
        self.forward_passes = 0         # probes run so far (what an apply cost, for tests)
        self._vectors = ProbeCache()

    def run(self, staged: Any, metadata: Mapping[str, Any], patches: Mapping[int, LayerPatch],
            head: Head | None) -> None:
        expected = metadata.get("canary")
        if expected is not None:
            self._check_outputs(staged, head, expected)
            return
        vouch = metadata.get("update_digest")
        if vouch is not None:
            served = self.backend.staged_patches(staged)
            checked = served if served is not None else patches
            problem = update_digest.mismatch(self.update_digest(checked, head),
                                             vouch["digest"], float(vouch["tolerance"]))
            if problem:
                raise HealthCheckError(f"update digest: {problem}; the packet was not decoded "
                                       "to what it says it carries")
            if served is not None and all(within_growth(p, *self.bundle.layer_scale(lid))
                                          for lid, p in served.items()):
                return
        check_finite(self._forward(staged, self.health_feeds))

    def update_digest(self, patches: Mapping[int, LayerPatch],
                      head: Head | None) -> list[list[float]]:
        updates = [LayerUpdate(lid, p.factors, p.scale, p.bias) for lid, p in patches.items()]
        logits = None
        if head is not None:
            logits = head.logits(update_digest.head_probe(self.hidden), None)
        return update_digest.digest(updates, logits, self._vectors)

    def _forward(self, staged: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.forward_passes += 1
        return self.backend.probe(staged, feeds)

    def _check_outputs(self, staged: Any, head: Head | None,
                       expected: Mapping[str, Any]) -> None:
        inputs = (self.bundle.bundle.manifest.get("canary") or {}).get("inputs")
        if not inputs:
            raise HealthCheckError("the packet carries a canary but the bundle has no canary "
                                   "inputs")
        feeds = self.family.feeds(inputs)
        raw = self._forward(staged, feeds)
        check_finite(raw)
        hidden, mask = self.family.hidden(raw, feeds)
        outputs = head.logits(hidden, mask) if head else embedding(hidden, mask)
        problem = canary.mismatch(outputs, expected["digest"], float(expected["tolerance"]))
        if problem:
            raise HealthCheckError(f"canary: {problem}; the adapter does not do what its "
                                   "packet says it does")
