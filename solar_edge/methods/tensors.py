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
from solar_edge.methods.base import Extras, LayerUpdate, Tensors

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
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error as exc:
            raise AdapterError(f"adapter_config.json: pattern {pattern!r} is not a regular "
                               f"expression ({exc})") from exc
        if hit:
            return value
    return default


def _module_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """``(<module path as saved>, suffix)`` for a key ``<module>.<suffix>``, else None."""
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def model_paths(tensors: Tensors, suffixes: Iterable[str]) -> dict[str, str]:
    """Normalised module name -> its path in the model PEFT wrapped (``bert.encoder...`` for
    a classifier): what PEFT matches ``rank_pattern`` / ``alpha_pattern`` keys against."""
    found = (_module_key(key, tuple(suffixes)) for key in tensors)
    return {normalise_name(path): path.removeprefix(PEFT_PREFIX)
            for path, _ in filter(None, found)}


def group(tensors: Tensors, suffixes: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {suffix: tensor}}`` for keys ``<module>.<suffix>``; other keys are skipped."""
    suffixes = tuple(suffixes)
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        found = _module_key(key, suffixes)
        if found is not None:
            modules.setdefault(normalise_name(found[0]), {})[found[1]] = value
    return modules


def require(parts: Tensors, module: str, names: Sequence[str]) -> list[np.ndarray]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterError(f"{module}: missing tensors {missing}")
    return [np.asarray(parts[n], dtype=np.float32) for n in names]


def checked_update(module: str, B: np.ndarray, A: np.ndarray) -> LayerUpdate:
    if B.ndim > 2 or A.ndim > 2:
        raise AdapterError(f"{module}: a LoRA on a convolution ({A.ndim}-D factors) is not "
                           "supported: only linear layers are adapted")
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise AdapterError(f"{module}: shape mismatch, B {B.shape} @ A {A.shape}")
    if not (np.isfinite(B).all() and np.isfinite(A).all()):
        raise AdapterError(f"{module}: non-finite values")
    return LayerUpdate(module, np.ascontiguousarray(B), np.ascontiguousarray(A))


def _module_of(key: str) -> str:
    """``base_model.model.model.embed_tokens.lora_embedding_A`` -> ``model.embed_tokens``."""
    return key.split(".lora_embedding_")[0].removeprefix("base_model.model.")


def reject_unknown(tensors: Tensors, known: Iterable[str]) -> None:
    known = tuple(known)
    extra = sorted(k for k in tensors if not any(k.endswith(s) for s in known))
    if not extra:
        return
    embedding = [k for k in extra if ".lora_embedding_" in k]
    whole = sorted({k.split(".base_layer.")[0].removeprefix("base_model.model.")
                    for k in extra if ".base_layer." in k})
    if embedding:
        raise AdapterError(f"a LoRA on an embedding ({_module_of(embedding[0])}"
                           "): only linear layers are adapted on the board; train without "
                           "embeddings in target_modules")
    if whole:
        raise AdapterError(f"the adapter saves the whole base weight of {', '.join(whole[:4])} "
                           "(PEFT does for a LoRA on a layer tied to the embeddings, such as "
                           "lm_head): the board adapts the bundle's linear layers only; train "
                           "without it in target_modules")
    raise AdapterError(
        f"tensors solar-edge cannot carry (embeddings? modules outside modules_to_save?): "
        f"{extra[:8]}"
    )


MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
SAVED_COPY = ".modules_to_save.default"  # how some PEFT versions name a saved module's copy


def _matches_module(name: str, modules: Iterable[str]) -> bool:
    """Whether tensor ``name`` belongs to one of ``modules`` as PEFT matches them: a module
    whose dotted path *ends with* the entry as a string, so ``classifier`` also covers
    DistilBERT's ``pre_classifier``, which PEFT wraps and saves with it."""
    parts = name.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(name == m or name.endswith("." + m) or any(p.endswith(m) for p in paths)
               for m in modules)


def split_extras(config: Mapping[str, Any], tensors: Tensors) -> tuple[dict[str, np.ndarray],
                                                                       Extras]:
    """PEFT's state dict -> (the method's own tensors, :class:`Extras`).

    Head tensors are those of the config's ``modules_to_save`` (``classifier.weight``...);
    biases are saved when ``bias`` is ``"lora_only"`` (VeRA: ``"vera_only"``) or ``"all"``
    (``<module>.base_layer.bias`` or ``<module>.bias``); DoRA's magnitudes are
    ``<module>.lora_magnitude_vector``.
    Names are base-model relative. Values stay float32 numpy arrays."""
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list | tuple) or not all(isinstance(m, str) for m in saved):
        raise AdapterError(f"adapter_config.json: modules_to_save must be a list of module "
                           f"names, got {str(saved)[:80]}")
    to_save = list(saved)
    bias = config.get("bias", "none")
    if bias not in (None, "none", "all", "lora_only", "vera_only"):  # vera_only: VeRA's own
        raise AdapterError(f"adapter_config.json: bias must be 'none', 'all' or 'lora_only' "
                           f"('vera_only' for VeRA), got {bias!r}")
    biases_on = bias not in (None, "none")
    own: dict[str, np.ndarray] = {}
    head: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    magnitudes: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = normalise_name(key).replace(SAVED_COPY, "")
        arr = np.asarray(value, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise AdapterError(f"{key}: non-finite values")
        magnitude = next((s for s in MAGNITUDE_SUFFIXES if key.endswith(s)), None)
        if magnitude is not None:
            magnitudes[name[: -len(magnitude)]] = arr.reshape(-1)
        elif to_save and key.startswith(PEFT_PREFIX) and _matches_module(name, to_save):
            head[name] = arr
        elif biases_on and key.endswith(".bias") and ".lora_" not in key:
            module = name[: -len(".bias")].removesuffix(".base_layer")
            biases[module] = arr.reshape(-1)
        else:
            own[key] = value
    return own, Extras(head, biases, magnitudes)


def per_module(tensors: Tensors) -> dict[str, np.ndarray]:
    """The tensors that belong to one adapted module (keys under ``base_model.model.``)."""
    return {k: v for k, v in tensors.items() if k.startswith(PEFT_PREFIX)}
