"""Per-layer input Gram matrices of the base model on calibration texts (torch, server side).

``calibration_grams(bundle, texts, layer_ids)`` runs the pretrained encoder on ``texts``
with forward hooks on the bundle's adaptable ``nn.Linear`` modules and returns
``{layer id: X^T X / tokens}`` (float64, padding tokens excluded). The activation-aware
codec (:mod:`solar_edge.encode.actaware`) weighs errors with these: ``|(dW - dW_hat) X^T|_F^2 =
tokens * tr(E G E^T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from solar_edge.format.bundle import Bundle


def _tokenize(bundle: Bundle, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_dir))
    enc = tok(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="np")
    return {k: np.asarray(enc[k], np.int64) for k in ("input_ids", "attention_mask")}


def calibration_grams(bundle: Bundle, texts: Sequence[str], layer_ids: Sequence[int],
                      model_dir: str | Path | None = None, max_len: int = 64,
                      batch: int = 32) -> dict[int, np.ndarray]:
    """``{layer id: X^T X / tokens}`` (float64) of each layer's input on ``texts`` (base model)."""
    import torch

    from solar_edge.exporters.train import load_base

    _, model = load_base(None if model_dir is None else str(model_dir))
    enc = _tokenize(bundle, texts, max_len)
    modules = dict(model.named_modules())
    grams: dict[int, np.ndarray] = {}
    count = [0]
    mask_now: list[torch.Tensor] = []
    hooks = []

    def hook_for(lid: int):
        def hook(_mod, inputs, _out) -> None:
            x = inputs[0][mask_now[0]].double()  # tokens x in (padding dropped)
            g = (x.T @ x).numpy()
            grams[lid] = grams[lid] + g if lid in grams else g
        return hook

    for lid in layer_ids:
        name = bundle.layer(lid).name
        hooks.append(modules[name].register_forward_hook(hook_for(lid)))
    try:
        with torch.inference_mode():
            for s in range(0, len(texts), batch):
                ids = torch.from_numpy(enc["input_ids"][s : s + batch])
                mask = torch.from_numpy(enc["attention_mask"][s : s + batch])
                mask_now[:] = [mask.bool()]
                count[0] += int(mask.sum())
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return {lid: g / count[0] for lid, g in grams.items()}


def calibration_fisher(bundle: Bundle, texts: Sequence[str], labels: Sequence[int],
                       dense_updates: dict[int, np.ndarray], head_seed: int, num_labels: int,
                       model_dir: str | Path | None = None, max_len: int = 64,
                       batch: int = 16) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """K-FAC factors of each adapted layer on labelled calibration texts, at the adapted model.

    Returns ``(G, Gamma)``: ``G[l] = X^T X / tokens`` (layer inputs) and ``Gamma[l] =
    sum_tokens g g^T / texts`` with ``g`` the gradient of the summed cross-entropy (frozen
    seeded head) at the layer's output. ``tr(Gamma E G E^T) / 2`` then estimates the loss
    increase of a weight error ``E`` (Kronecker-factored Fisher), in the same units for every
    layer, which is what a global byte allocation needs.
    """
    import torch

    from solar_edge.exporters.train import load_base, logits_from_hidden, torch_head

    _, model = load_base(None if model_dir is None else str(model_dir))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for lid, dw in dense_updates.items():
            modules[bundle.layer(lid).name].weight += torch.from_numpy(np.asarray(dw, np.float32))
    head = torch_head(head_seed, num_labels, int(model.config.hidden_size))
    enc = _tokenize(bundle, texts, max_len)
    lids = sorted(dense_updates)
    g_in: dict[int, np.ndarray] = {}
    g_out: dict[int, np.ndarray] = {}
    mask_now: list[torch.Tensor] = []
    hooks = []

    def add(store: dict, lid: int, x: torch.Tensor) -> None:
        x = x[mask_now[0]].double()
        g = (x.T @ x).numpy()
        store[lid] = store[lid] + g if lid in store else g

    def hook_for(lid: int):
        def hook(_mod, inputs, out) -> None:
            add(g_in, lid, inputs[0].detach())
            out.register_hook(lambda grad: add(g_out, lid, grad))
        return hook

    for lid in lids:
        hooks.append(modules[bundle.layer(lid).name].register_forward_hook(hook_for(lid)))
    tokens = 0
    y = torch.tensor(list(labels))
    try:
        for s in range(0, len(texts), batch):
            ids = torch.from_numpy(enc["input_ids"][s : s + batch])
            mask = torch.from_numpy(enc["attention_mask"][s : s + batch])
            mask_now[:] = [mask.bool()]
            tokens += int(mask.sum())
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = torch.nn.functional.cross_entropy(
                logits_from_hidden(hidden, mask, head), y[s : s + batch], reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return ({lid: g / tokens for lid, g in g_in.items()},
            {lid: g / len(texts) for lid, g in g_out.items()})
