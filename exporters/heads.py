"""Task heads in torch, the same the board builds (:mod:`solar_edge.runtime.heads`).

``head_for(metadata, hidden, tensors, bundle)`` -> ``head(hidden_states, mask) -> logits``:

* a trained head (metadata ``head``, e.g. PEFT's ``modules_to_save`` classifier), from
  ``tensors`` (name -> array: the adapter's own, or what a packet decodes to) and the
  bundle's ``head_parts`` (BERT's pooler);
* the project's seeded head (``labels`` + ``head_seed``): ``LOGIT_SCALE * unit(mean) @ H.T``.

An adapter without a head has no logits (None); the steps that need them say so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from solar_edge.errors import CalibrationError
from solar_edge.exporters.families.base import mean_pooled, unit
from solar_edge.format.bundle import Bundle
from solar_edge.regen.heads import LOGIT_SCALE, task_head

Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, mask) -> logits
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "relu": torch.relu, "identity": lambda x: x}


def seeded_head(head_seed: int, num_labels: int, hidden: int) -> torch.Tensor:
    """The seeded head matrix ``H`` (``num_labels x hidden``) as a torch tensor."""
    return torch.from_numpy(task_head(head_seed, num_labels, hidden))


def _pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    return hidden[:, 0] if how == "cls" else mean_pooled(hidden, mask)


def trained_head(spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                 base_part: Callable[[str], np.ndarray | None]) -> Head:
    """``pool -> [activation(pooler)] -> linear``, as ``spec`` (metadata ``head``) says."""
    def get(name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        value = tensors[name] if name in tensors else base_part(name)
        return None if value is None else torch.from_numpy(np.asarray(value, np.float32))

    weight, bias = get(spec.get("weight")), get(spec.get("bias"))
    if weight is None:
        raise CalibrationError(f"head weight {spec.get('weight')!r} is not among the tensors")
    pooler = None
    if spec.get("pooler"):
        w = get(f"{spec['pooler']}.weight")
        if w is None:
            raise CalibrationError(f"head pooler {spec['pooler']!r} is neither in the adapter "
                                   "nor in the bundle")
        pooler = (w, get(f"{spec['pooler']}.bias"))
    act = ACTIVATIONS[str(spec.get("activation", "tanh"))]
    how = str(spec.get("pooling", "cls"))

    def head(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = _pool(hidden, mask, how)
        if pooler is not None:
            x = act(torch.nn.functional.linear(x, pooler[0], pooler[1]))
        return torch.nn.functional.linear(x, weight, bias)

    return head


def head_for(metadata: Mapping[str, Any], hidden: int,
             tensors: Mapping[str, np.ndarray] | None = None,
             bundle: Bundle | None = None) -> Head | None:
    """The adapter's task head in torch, or None when it has none."""
    if "head" in metadata:
        base = bundle.head_part if bundle is not None else (lambda name: None)
        return trained_head(metadata["head"], tensors or {}, base)
    labels = metadata.get("labels")
    if not labels or "head_seed" not in metadata:
        return None
    weight = seeded_head(int(metadata["head_seed"]), len(labels), hidden)
    return lambda h, mask: LOGIT_SCALE * unit(mean_pooled(h, mask)) @ weight.T
