"""PEFT LoRA and DoRA: ``dW = B @ A * s`` with ``s = lora_alpha / r`` (``/ sqrt(r)``, rsLoRA).

Per-module ``rank_pattern`` / ``alpha_pattern`` are honoured. DoRA (``use_dora=True``) adds
a magnitude vector ``m`` per module: the merged weight is ``diag(m / |W0 + dW|_row) (W0 + dW)``.
``lora_bias=True`` gives ``lora_B`` a bias ``b``: the module's bias grows by ``s * b``
(:attr:`~solar_edge.methods.base.Extras.bias_deltas`).
Heads (``modules_to_save``), trained biases and magnitudes are read by
:func:`~solar_edge.methods.tensors.split_extras`. LoRA has no frozen basis the device can
regenerate, so it is compressed (never carried exactly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError
from solar_edge.methods.base import Extras, LayerUpdate, Method, Tensors
from solar_edge.methods.tensors import (
    checked_update,
    group,
    model_paths,
    pattern_value,
    reject_unknown,
    require,
    split_extras,
)

SUFFIXES = ("lora_A.weight", "lora_B.weight")
LORA_BIAS = "lora_B.bias"  # PEFT's lora_bias=True


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
    for flag in ("use_dora", "use_rslora", "lora_bias"):
        if not (config.get(flag) is None or isinstance(config.get(flag), bool)):  # not 0/1
            raise AdapterError(f"adapter_config.json: {flag} must be true or false, got "
                               f"{config.get(flag)!r}")


BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")  # and pissa_niter_K


def check_served_as_plain_lora(config: Mapping[str, Any]) -> None:
    """Refuse LoRA variants whose saved factors do not mean ``W0 + dW`` on the pristine base:
    the board would serve them without a word, wrong."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_niter")[0] in BASE_CHANGING_INITS:
        raise AdapterError(f"init_lora_weights={init!r}: the adapter's base is the model minus "
                           "its initial factors, not the bundle's weights; save it converted to "
                           "plain LoRA (save_pretrained(..., path_initial_model_for_weight_"
                           "conversion=DIR_OF_THE_INITIAL_ADAPTER))")
    if config.get("layer_replication"):
        raise AdapterError("layer_replication (layers repeated in the model) is not supported: "
                           "the board serves the base model's own layers")
    if config.get("alora_invocation_tokens"):
        raise AdapterError("aLoRA (alora_invocation_tokens: active only after those tokens) is "
                           "not supported: the board would apply it to every token")


def read(config: Mapping[str, Any], tensors: Tensors,
         task_meta: Mapping[str, Any]) -> tuple[dict[str, LayerUpdate], None, Extras]:
    check_config(config)
    check_served_as_plain_lora(config)
    tensors, extras = split_extras(config, tensors)
    if config.get("use_dora") and not extras.magnitudes:
        raise AdapterError("a DoRA adapter (use_dora=True) without lora_magnitude_vector tensors")
    lora_biases = {module: np.asarray(parts[LORA_BIAS], np.float32).reshape(-1)
                   for module, parts in group(tensors, (LORA_BIAS,)).items()}
    if lora_biases and not config.get("lora_bias"):
        raise AdapterError(f"lora_B biases without lora_bias=True in adapter_config.json: "
                           f"{sorted(lora_biases)[:3]}")
    if config.get("lora_bias") and config.get("use_dora"):
        raise AdapterError("lora_bias=True with use_dora=True (PEFT refuses it too)")
    reject_unknown(tensors, SUFFIXES + ((LORA_BIAS,) if config.get("lora_bias") else ()))
    updates = {}
    bias_deltas = {}
    paths = model_paths(tensors, SUFFIXES)
    for module, parts in sorted(group(tensors, SUFFIXES).items()):
        A, B = require(parts, module, SUFFIXES)
        r = A.shape[0]
        expected_r = int(pattern_value(config.get("rank_pattern"), paths[module], config["r"]))
        if r != expected_r:
            raise AdapterError(f"{module}: rank {r} in tensors, {expected_r} in config")
        alpha = float(pattern_value(config.get("alpha_pattern"), paths[module],
                                    config["lora_alpha"]))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[module] = checked_update(module, B * np.float32(scaling), A)
        if module in lora_biases:
            if lora_biases[module].shape != (B.shape[0],):
                raise AdapterError(f"{module}: lora_B bias of shape "
                                   f"{lora_biases[module].shape} for {B.shape[0]} outputs")
            bias_deltas[module] = lora_biases[module] * np.float32(scaling)
    stray = sorted(set(extras.magnitudes) - set(updates))
    if stray:
        raise AdapterError(f"DoRA magnitudes for modules without LoRA factors: {stray[:5]}")
    stray = sorted(set(lora_biases) - set(updates))
    if stray:
        raise AdapterError(f"lora_B biases for modules without LoRA factors: {stray[:5]}")
    return updates, None, replace(extras, bias_deltas=bias_deltas)


METHOD = Method("lora", read)
