"""PEFT AdaLoRA: ``dW = B @ (diag(E) A) * lora_alpha / (init_r + 1e-5)``.

PEFT divides by the initial rank even after pruning; pruned ranks are already cut from the
saved tensors (a module whose every rank was pruned has no update).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError
from solar_edge.methods.base import Extras, LayerUpdate, Method, Tensors
from solar_edge.methods.tensors import (
    checked_update,
    group,
    reject_unknown,
    require,
    split_extras,
)

ADALORA_EPS = 1e-5  # PEFT's AdaLoRA adds this to the rank it divides by
SUFFIXES = ("lora_A", "lora_B", "lora_E")


def read(config: Mapping[str, Any], tensors: Tensors,
         task_meta: Mapping[str, Any]) -> tuple[dict[str, LayerUpdate], None, Extras]:
    tensors, extras = split_extras(config, tensors)
    reject_unknown(tensors, SUFFIXES)
    alpha = float(config["lora_alpha"])
    init_r = int(config["init_r"])
    scaling = (alpha if alpha > 0 else init_r) / (init_r + ADALORA_EPS)
    updates = {}
    for module, parts in sorted(group(tensors, SUFFIXES).items()):
        A, B, E = require(parts, module, SUFFIXES)
        if E.shape != (A.shape[0], 1):
            raise AdapterError(f"{module}: lora_E shape {E.shape}, expected ({A.shape[0]}, 1)")
        if A.shape[0] == 0:
            continue  # every rank of this module was pruned: no update
        updates[module] = checked_update(module, B * np.float32(scaling), A * E)
    return updates, None, extras


METHOD = Method("adalora", read)
