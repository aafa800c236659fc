"""Per-layer input Gram matrices of the base model on calibration texts (torch, server side).

``calibration_grams(bundle, texts, layer_ids)`` runs the pretrained encoder on ``texts``
with forward hooks on the bundle's adaptable ``nn.Linear`` modules and returns
``{layer id: X^T X / tokens}`` (float64, padding tokens excluded). The activation-aware
codec (:mod:`solar_edge.actaware`) weighs errors with these: ``|(dW - dW_hat) X^T|_F^2 =
tokens * tr(E G E^T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from solar_edge.bundle import Bundle


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
