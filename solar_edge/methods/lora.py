"""PEFT LoRA: ``dW = B @ A * s`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

Per-module ``rank_pattern`` / ``alpha_pattern`` are honoured. LoRA has no frozen basis the
device can regenerate, so it is compressed (never carried exactly) and needs no record
kind of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError
from solar_edge.methods.base import LayerUpdate, Method, Tensors
from solar_edge.methods.tensors import (
    checked_update,
    group,
    pattern_value,
    reject_unknown,
    require,
)

SUFFIXES = ("lora_A.weight", "lora_B.weight")


def read(config: Mapping[str, Any], tensors: Tensors,
         task_meta: Mapping[str, Any]) -> tuple[dict[str, LayerUpdate], None]:
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported (the magnitude vector is not low-rank)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError("LoRA adapters with trained biases are not supported")
    reject_unknown(tensors, SUFFIXES)
    updates = {}
    for module, parts in sorted(group(tensors, SUFFIXES).items()):
        A, B = require(parts, module, SUFFIXES)
        r = A.shape[0]
        expected_r = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
        if r != expected_r:
            raise AdapterError(f"{module}: rank {r} in tensors, {expected_r} in config")
        alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[module] = checked_update(module, B * np.float32(scaling), A)
    return updates, None


METHOD = Method("lora", read)
