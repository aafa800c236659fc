"""Per-layer statistics of a bundle's base model on calibration inputs (torch, server side).

* :func:`calibration_grams`: ``{layer id: X^T X / positions}`` of each adapted layer's input
  (padding excluded), the ``G`` of the activation-aware distortion ``tr(E G E^T)``
  (:mod:`solar_edge.encode.actaware`);
* :func:`calibration_fisher`: the K-FAC pair ``(G, Gamma)`` at the *adapted* model, with
  ``Gamma`` the second moment of the loss gradient at each layer's output, so
  ``tr(Gamma E G E^T) / 2`` estimates the loss increase of a weight error ``E`` in the same
  units for every layer. With labels, the loss is the cross-entropy to them; without, to
  labels drawn from the adapted model's own output distribution (the true Fisher), so
  unlabelled calibration text works.

The model is the bundle's own (:func:`solar_edge.exporters.families.open_bundle_model`);
its family turns raw inputs into feeds and features.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from solar_edge.exporters.families.base import TorchModel
from solar_edge.exporters.heads import Head
from solar_edge.exporters.patches import TorchPatch, patched
from solar_edge.format.bundle import Bundle


def _modules(model: TorchModel, bundle: Bundle, layer_ids: Sequence[int]) -> dict[int, Any]:
    modules = dict(model.module.named_modules())
    return {lid: modules[bundle.layer(lid).name] for lid in layer_ids}


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _accumulate(store: dict[int, np.ndarray], lid: int, x: torch.Tensor,
                mask: torch.Tensor) -> None:
    x = x[mask].double()  # positions x features, padding dropped
    g = (x.T @ x).numpy()
    store[lid] = store[lid] + g if lid in store else g


def calibration_grams(model: TorchModel, bundle: Bundle, inputs: Sequence[Any],
                      layer_ids: Sequence[int], max_len: int = 64,
                      batch: int = 32) -> dict[int, np.ndarray]:
    """``{layer id: X^T X / positions}`` (float64) of each layer's input, base model."""
    grams: dict[int, np.ndarray] = {}
    mask_now: list[torch.Tensor] = []
    count = 0

    def hook_for(lid: int):
        def hook(_mod, args, _out) -> None:
            _accumulate(grams, lid, args[0], mask_now[0])
        return hook

    handles = [m.register_forward_hook(hook_for(lid))
               for lid, m in _modules(model, bundle, layer_ids).items()]
    with _hooks(handles), torch.inference_mode():
        for s in range(0, len(inputs), batch):
            feeds = model.feeds(inputs[s : s + batch], max_len)
            mask_now[:] = [model.token_mask(feeds)]
            count += int(mask_now[0].sum())
            model.module(**feeds)
    return {lid: g / count for lid, g in grams.items()}


def calibration_fisher(model: TorchModel, bundle: Bundle, inputs: Sequence[Any],
                       labels: Sequence[int] | None, patches: Mapping[int, TorchPatch],
                       head: Head, max_len: int = 64, batch: int = 16, seed: int = 0,
                       ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """K-FAC factors ``(G, Gamma)`` of each patched layer at the adapted model (see module).

    ``patches``: the adapter applied through hooks (:func:`~solar_edge.exporters.patches.
    adapter_patches`). ``G[l] = X^T X / positions`` and ``Gamma[l] = sum g g^T / inputs``
    with ``g`` the loss gradient at the layer's patched output."""
    lids = sorted(patches)
    g_in: dict[int, np.ndarray] = {}
    g_out: dict[int, np.ndarray] = {}
    mask_now: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(seed)

    def input_hook(lid: int):
        def hook(_mod, args) -> None:
            _accumulate(g_in, lid, args[0].detach(), mask_now[0])
        return hook

    def on_output(lid: int, y: torch.Tensor) -> None:
        if not y.requires_grad:  # the first patched layer: nothing before it needs gradients
            y.requires_grad_(True)
        y.register_hook(lambda grad: _accumulate(g_out, lid, grad, mask_now[0]))

    positions = 0
    frozen = [(p, p.requires_grad) for p in model.module.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # gradients only at the layer outputs
    handles = [m.register_forward_pre_hook(input_hook(lid))
               for lid, m in _modules(model, bundle, lids).items()]
    try:
        with _hooks(handles), patched(model.module, bundle, patches, on_output):
            for s in range(0, len(inputs), batch):
                feeds = model.feeds(inputs[s : s + batch], max_len)
                mask_now[:] = [model.token_mask(feeds)]
                positions += int(mask_now[0].sum())
                logits = head(*model.hidden(feeds))
                if labels is None:  # the model's own predictive distribution
                    target = torch.multinomial(torch.softmax(logits.detach(), -1), 1,
                                               generator=gen).squeeze(1)
                else:
                    target = torch.tensor(list(labels[s : s + batch]))
                loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                loss.backward()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return ({lid: g / positions for lid, g in g_in.items()},
            {lid: g / len(inputs) for lid, g in g_out.items()})
