"""Pure helpers for reading PEFT state dicts: module names, grouping by suffix, checks.

Module names are normalised to the base transformer's own names (``base_model.model.`` and
a leading ``bert.``/``model.`` removed), e.g. ``encoder.layer.0.attention.self.query``: the
names bundle manifests use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError
from solar_edge.methods.base import LayerUpdate, Tensors

PEFT_PREFIX = "base_model.model."
MODEL_PREFIXES = ("bert.", "model.")


def normalise_name(key: str) -> str:
    """``base_model.model.bert.encoder.layer.0...`` -> ``encoder.layer.0...``."""
    name = key.removeprefix(PEFT_PREFIX)
    for prefix in MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's per-module override: first pattern matching the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def group(tensors: Tensors, suffixes: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {suffix: tensor}}`` for keys ``<module>.<suffix>``; other keys are skipped."""
    suffixes = tuple(suffixes)
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for suffix in suffixes:
            if key.endswith("." + suffix):
                module = normalise_name(key[: -len(suffix) - 1])
                modules.setdefault(module, {})[suffix] = value
                break
    return modules


def require(parts: Tensors, module: str, names: Sequence[str]) -> list[np.ndarray]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterError(f"{module}: missing tensors {missing}")
    return [np.asarray(parts[n], dtype=np.float32) for n in names]


def checked_update(module: str, B: np.ndarray, A: np.ndarray) -> LayerUpdate:
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise AdapterError(f"{module}: shape mismatch, B {B.shape} @ A {A.shape}")
    if not (np.isfinite(B).all() and np.isfinite(A).all()):
        raise AdapterError(f"{module}: non-finite values")
    return LayerUpdate(module, np.ascontiguousarray(B), np.ascontiguousarray(A))


def reject_unknown(tensors: Tensors, known: Iterable[str]) -> None:
    known = tuple(known)
    extra = sorted(k for k in tensors if not any(k.endswith(s) for s in known))
    if extra:
        raise AdapterError(
            f"tensors solar-edge cannot carry (biases, modules_to_save, embeddings?): {extra[:8]}"
        )


def per_module(tensors: Tensors) -> dict[str, np.ndarray]:
    """The tensors that belong to one adapted module (keys under ``base_model.model.``)."""
    return {k: v for k, v in tensors.items() if k.startswith(PEFT_PREFIX)}
