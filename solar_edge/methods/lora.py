"""PEFT LoRA and DoRA: ``dW = B @ A * s`` with ``s = lora_alpha / r`` (``/ sqrt(r)``, rsLoRA).

Per-module ``rank_pattern`` / ``alpha_pattern`` are honoured. DoRA (``use_dora=True``) adds
a magnitude vector ``m`` per module: the merged weight is ``diag(m / |W0 + dW|_row) (W0 + dW)``.
Heads (``modules_to_save``), trained biases and magnitudes are read by
:func:`~solar_edge.methods.tensors.split_extras`. LoRA has no frozen basis the device can
regenerate, so it is compressed (never carried exactly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError
from solar_edge.methods.base import Extras, LayerUpdate, Method, Tensors
from solar_edge.methods.tensors import (
    checked_update,
    group,
    pattern_value,
    reject_unknown,
    require,
    split_extras,
)

SUFFIXES = ("lora_A.weight", "lora_B.weight")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_config(config: Mapping[str, Any]) -> None:
    """The fields ``read`` computes with have PEFT's types: one line for anything else
    (a hand-edited or hostile ``adapter_config.json``)."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if "r" in config and not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise AdapterError(f"adapter_config.json: r must be a positive integer, got {r!r}")
    if "lora_alpha" in config and not _is_number(alpha):
        raise AdapterError(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    for field, ok, what in (("rank_pattern", lambda v: isinstance(v, int) and
                             not isinstance(v, bool) and v >= 1, "positive integers"),
                            ("alpha_pattern", _is_number, "numbers")):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping) or not all(
                isinstance(k, str) and ok(v) for k, v in patterns.items()):
            raise AdapterError(f"adapter_config.json: {field} must map module patterns to "
                               f"{what}, got {str(patterns)[:80]}")
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag) not in (None, True, False):
            raise AdapterError(f"adapter_config.json: {flag} must be true or false, got "
                               f"{config.get(flag)!r}")


def read(config: Mapping[str, Any], tensors: Tensors,
         task_meta: Mapping[str, Any]) -> tuple[dict[str, LayerUpdate], None, Extras]:
    check_config(config)
    if config.get("lora_bias"):
        raise AdapterError("lora_bias=True (a bias on lora_B) is not supported; PEFT's "
                           'bias="lora_only" or "all" is')
    tensors, extras = split_extras(config, tensors)
    if config.get("use_dora") and not extras.magnitudes:
        raise AdapterError("a DoRA adapter (use_dora=True) without lora_magnitude_vector tensors")
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
    stray = sorted(set(extras.magnitudes) - set(updates))
    if stray:
        raise AdapterError(f"DoRA magnitudes for modules without LoRA factors: {stray[:5]}")
    return updates, None, extras


METHOD = Method("lora", read)
