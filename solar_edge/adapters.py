"""PEFT adapter directory -> per-layer low-rank updates ``dW = B @ A`` (numpy, no torch).

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT writes them, plus
an optional ``task.json`` (written by the project's training scripts), and folds each
method's scaling into the factors so that ``dW = B @ A`` is exactly what PEFT's
``merge_and_unload`` adds to the base weight:

* LoRA: ``B @ A * s`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA; per-module
  ``rank_pattern`` / ``alpha_pattern`` honoured).
* AdaLoRA: ``B @ (diag(E) A) * lora_alpha / (init_r + 1e-5)`` (PEFT divides by the initial
  rank even after pruning; pruned ranks are already cut from the saved tensors).
* VeRA: ``(diag(lambda_b) B_shared[:out]) @ (diag(lambda_d) A_shared[:, :in])``; needs the
  shared projections saved (``save_projection=True``).
* TinyLoRA / LoRA-XS: ``B_svd @ R @ A_svd`` with ``R = sum_i v_i P_i``; the frozen SVD
  factors and projections must be saved. Which ``v`` a module uses depends on PEFT's module
  order, taken from ``task.json["module_order"]`` when present, else from BERT's order.

Module names are normalised to the base transformer's own names (``base_model.model.`` and a
leading ``bert.``/``model.`` removed), e.g. ``encoder.layer.0.attention.self.query``: the names
bundle manifests use. Parsing (:func:`updates_from_tensors`) is pure; only
:func:`read_adapter` touches the disk.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from solar_edge.codec import LayerUpdate
from solar_edge.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_FILE = "task.json"
PEFT_PREFIX = "base_model.model."
MODEL_PREFIXES = ("bert.", "model.")
ADALORA_EPS = 1e-5  # PEFT's AdaLoRA adds this to the rank it divides by
MAX_CONFIG_BYTES = 1 << 20

Tensors = Mapping[str, np.ndarray]
Updates = dict[str, LayerUpdate]

# Order of BERT submodules inside one encoder layer, as ``named_modules`` visits them.
_BERT_ORDER = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "intermediate.dense", "output.dense")


@dataclass(frozen=True)
class VeraParts:
    """What a VeRA adapter trains and shares: per-module ``(lambda_b, lambda_d)`` and the saved
    projections with their PEFT ``projection_prng_key`` (to carry it coefficient-only)."""

    key: int
    scales: dict[str, tuple[np.ndarray, np.ndarray]]
    shared_A: np.ndarray
    shared_B: np.ndarray


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter as per-layer updates. ``kind`` is PEFT's type in lower case."""

    kind: str
    config: dict[str, Any]
    task_meta: dict[str, Any]
    updates: dict[str, LayerUpdate] = field(default_factory=dict)
    vera: VeraParts | None = None

    def dense(self, name: str) -> np.ndarray:
        u = self.updates[name]
        return u.B @ u.A

    @property
    def label(self) -> str:
        """The project's adapter kind (e.g. ``lora-xs``) when known, else PEFT's type."""
        return str(self.task_meta.get("adapter_kind", self.kind))


def normalise_name(key: str) -> str:
    """``base_model.model.bert.encoder.layer.0...`` -> ``encoder.layer.0...``."""
    name = key.removeprefix(PEFT_PREFIX)
    for prefix in MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's per-module override: first pattern matching the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _group(tensors: Tensors, suffixes: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {suffix: tensor}}`` for keys ``<module>.<suffix>``; other keys are rejected."""
    suffixes = tuple(suffixes)
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for suffix in suffixes:
            if key.endswith("." + suffix):
                module = normalise_name(key[: -len(suffix) - 1])
                modules.setdefault(module, {})[suffix] = value
                break
    return modules


def _require(parts: Tensors, module: str, names: Sequence[str]) -> list[np.ndarray]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterError(f"{module}: missing tensors {missing}")
    return [np.asarray(parts[n], dtype=np.float32) for n in names]


def _check_factors(module: str, B: np.ndarray, A: np.ndarray) -> LayerUpdate:
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise AdapterError(f"{module}: shape mismatch, B {B.shape} @ A {A.shape}")
    if not (np.isfinite(B).all() and np.isfinite(A).all()):
        raise AdapterError(f"{module}: non-finite values")
    return LayerUpdate(module, np.ascontiguousarray(B), np.ascontiguousarray(A))


def _unexpected(tensors: Mapping[str, np.ndarray], known: Iterable[str]) -> None:
    known = tuple(known)
    extra = sorted(k for k in tensors if not any(k.endswith(s) for s in known))
    if extra:
        raise AdapterError(
            f"tensors solar-edge cannot carry (biases, modules_to_save, embeddings?): {extra[:8]}"
        )


def _lora(config: Mapping[str, Any], tensors: Tensors) -> Updates:
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported (the magnitude vector is not low-rank)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError("LoRA adapters with trained biases are not supported")
    suffixes = ("lora_A.weight", "lora_B.weight")
    _unexpected(tensors, suffixes)
    updates = {}
    for module, parts in sorted(_group(tensors, suffixes).items()):
        A, B = _require(parts, module, suffixes)
        r = A.shape[0]
        expected_r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        if r != expected_r:
            raise AdapterError(f"{module}: rank {r} in tensors, {expected_r} in config")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[module] = _check_factors(module, B * np.float32(scaling), A)
    return updates


def _adalora(config: Mapping[str, Any], tensors: Tensors) -> Updates:
    suffixes = ("lora_A", "lora_B", "lora_E")
    _unexpected(tensors, suffixes)
    alpha = float(config["lora_alpha"])
    init_r = int(config["init_r"])
    scaling = (alpha if alpha > 0 else init_r) / (init_r + ADALORA_EPS)
    updates = {}
    for module, parts in sorted(_group(tensors, suffixes).items()):
        A, B, E = _require(parts, module, suffixes)
        if E.shape != (A.shape[0], 1):
            raise AdapterError(f"{module}: lora_E shape {E.shape}, expected ({A.shape[0]}, 1)")
        if A.shape[0] == 0:
            continue  # every rank of this module was pruned: no update
        updates[module] = _check_factors(module, B * np.float32(scaling), A * E)
    return updates


def _shared(tensors: Mapping[str, np.ndarray], name: str, method: str) -> np.ndarray:
    keys = [k for k in tensors if not k.startswith(PEFT_PREFIX) and k.endswith(f".{name}")]
    if not keys:
        raise AdapterError(f"{method} adapter lacks the shared '{name}' tensor; save it with "
                           "save_projection=True (torch's generator is not portable)")
    return np.asarray(tensors[keys[0]], dtype=np.float32)


def _vera(config: Mapping[str, Any], tensors: Tensors) -> Updates:
    if config.get("bias", "none") != "none":
        raise AdapterError("VeRA adapters with trained biases are not supported")
    shared_A = _shared(tensors, "vera_A", "VeRA")
    shared_B = _shared(tensors, "vera_B", "VeRA")
    per_module = {k: v for k, v in tensors.items() if k.startswith(PEFT_PREFIX)}
    suffixes = ("vera_lambda_b", "vera_lambda_d")
    _unexpected(per_module, suffixes)
    r = shared_A.shape[0]
    if shared_A.ndim != 2 or shared_B.ndim != 2 or shared_B.shape[1] != r:
        raise AdapterError(f"VeRA shared shapes A {shared_A.shape}, B {shared_B.shape}")
    updates = {}
    for module, parts in sorted(_group(per_module, suffixes).items()):
        lam_b, lam_d = _require(parts, module, suffixes)
        out = lam_b.shape[0]
        if lam_d.shape != (r,) or out > shared_B.shape[0]:
            raise AdapterError(f"{module}: lambda_d {lam_d.shape}, lambda_b {lam_b.shape} do not "
                               f"fit shared A {shared_A.shape}, B {shared_B.shape}")
        B = lam_b[:, None] * shared_B[:out]
        A = lam_d[:, None] * shared_A  # sliced to the module's in_features by the caller
        updates[module] = _check_factors(module, B, A)
    return updates


def bert_module_order(names: Iterable[str]) -> list[str]:
    """Order in which ``named_modules`` visits BERT-style modules (layer index numerically)."""
    def key(name: str) -> tuple[int, int, str]:
        m = re.search(r"layer\.(\d+)\.(.+)$", name)
        if not m or m.group(2) not in _BERT_ORDER:
            raise AdapterError(f"cannot infer PEFT's module order for {name!r}; "
                               "give task.json a 'module_order' list")
        return int(m.group(1)), _BERT_ORDER.index(m.group(2)), name

    return sorted(names, key=key)


def _tinylora(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
              module_order: Sequence[str] | None) -> dict[str, LayerUpdate]:
    per_module = {k: v for k, v in tensors.items() if k.startswith(PEFT_PREFIX)}
    suffixes = ("tinylora_A", "tinylora_B", "tinylora_P")
    _unexpected(per_module, suffixes)
    groups = _group(per_module, suffixes)
    vectors = {k.rsplit(".", 1)[1]: np.asarray(v, dtype=np.float32) for k, v in tensors.items()
               if not k.startswith(PEFT_PREFIX) and ".tinylora_v." in k}
    order = list(module_order) if module_order is not None else bert_module_order(groups)
    if sorted(order) != sorted(groups):
        raise AdapterError("module_order does not list exactly the adapter's modules")
    n = len(order)
    # PEFT's grouping (tinylora/model.py): layer_idx // group_size, capped at num_groups - 1.
    num_groups = max(1, round(n * (1.0 - float(config.get("weight_tying", 0.0)))))
    group_size = max(1, n // num_groups)
    updates = {}
    for layer_idx, module in enumerate(order):
        A, B, P = _require(groups[module], module, suffixes)
        key = str(min(layer_idx // group_size, num_groups - 1))
        if key not in vectors:
            raise AdapterError(f"{module}: missing tinylora_v.{key}")
        v = vectors[key]
        r = A.shape[0]
        if P.shape != (v.shape[0], r, r):
            raise AdapterError(
                f"{module}: projections {P.shape}, expected ({v.shape[0]}, {r}, {r})")
        R = np.einsum("i,ijk->jk", v.astype(np.float64), P.astype(np.float64)).astype(np.float32)
        updates[module] = _check_factors(module, B @ R, A)
    return updates


def updates_from_tensors(peft_type: str, config: Mapping[str, Any],
                         tensors: Mapping[str, np.ndarray],
                         module_order: Sequence[str] | None = None) -> dict[str, LayerUpdate]:
    """Per-module ``LayerUpdate`` (scaling folded in) from a PEFT state dict. Pure."""
    kind = peft_type.upper()
    try:
        if kind == "LORA":
            updates = _lora(config, tensors)
        elif kind == "ADALORA":
            updates = _adalora(config, tensors)
        elif kind == "VERA":
            updates = _vera(config, tensors)
        elif kind == "TINYLORA":
            updates = _tinylora(config, tensors, module_order)
        else:
            raise AdapterError(f"unsupported adapter type {peft_type!r} "
                               "(supported: LORA, ADALORA, VERA, TINYLORA)")
    except KeyError as exc:
        raise AdapterError(f"adapter_config.json lacks {exc}") from exc
    if not updates:
        raise AdapterError("adapter holds no layer updates")
    return updates


def _load_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT adapter directory. Raises :class:`AdapterError` on anything unusable."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: not a directory")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"{root}: missing {CONFIG_FILE}")
    if not weights_path.is_file():
        pickled = (root / "adapter_model.bin").exists()
        hint = " (pickled adapter_model.bin is not read)" if pickled else ""
        raise AdapterError(f"{root}: missing {WEIGHTS_FILE}{hint}")
    config = _load_json(config_path)
    meta = _load_json(root / TASK_FILE) if (root / TASK_FILE).is_file() else {}
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterError(f"{config_path}: no peft_type")
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(weights_path))
    except ImportError as exc:
        raise AdapterError("reading adapters needs the safetensors package") from exc
    except Exception as exc:  # safetensors raises its own and numpy errors (e.g. bfloat16)
        raise AdapterError(f"{weights_path}: cannot read safetensors ({exc})") from exc
    order = meta.get("module_order")
    updates = updates_from_tensors(peft_type, config, tensors, order)
    shapes = meta.get("module_shapes")
    if isinstance(shapes, Mapping):
        updates = fit_shapes(updates, shapes)
    vera = None
    if peft_type.upper() == "VERA":
        per_module = {normalise_name(k): v for k, v in
                      _group({k: t for k, t in tensors.items() if k.startswith(PEFT_PREFIX)},
                             ("vera_lambda_b", "vera_lambda_d")).items()}
        vera = VeraParts(int(config.get("projection_prng_key", 0)),
                         {name: (np.asarray(parts["vera_lambda_b"], np.float32),
                                 np.asarray(parts["vera_lambda_d"], np.float32))
                          for name, parts in per_module.items()},
                         _shared(tensors, "vera_A", "VeRA"), _shared(tensors, "vera_B", "VeRA"))
    return Adapter(kind=peft_type.lower(), config=config, task_meta=meta, updates=updates,
                   vera=vera)


def fit_shapes(updates: Mapping[str, LayerUpdate],
               shapes: Mapping[str, Sequence[int]]) -> dict[str, LayerUpdate]:
    """Check each update against its layer's ``(out, in)``; cut shared factors wider than it.

    VeRA's shared ``A`` spans the widest targeted layer; a narrower layer uses its first
    ``in`` columns.
    """
    fitted = {}
    for name, update in updates.items():
        if name not in shapes:
            raise AdapterError(f"{name}: no shape recorded for this module")
        out, inp = (int(x) for x in shapes[name])
        if update.B.shape[0] != out or update.A.shape[1] < inp:
            raise AdapterError(f"{name}: update {update.B.shape[0]}x{update.A.shape[1]} "
                               f"does not fit layer {out}x{inp}")
        if update.A.shape[1] > inp:
            update = LayerUpdate(update.name, update.B, np.ascontiguousarray(update.A[:, :inp]))
        fitted[name] = update
    return fitted


def _layer_name(entry: Any) -> str:
    if isinstance(entry, str):
        name = entry
    elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        name = entry["name"]
    elif isinstance(getattr(entry, "name", None), str):  # solar_edge.bundle.BundleLayer
        name = entry.name
    else:
        raise AdapterError(f"manifest layer entry without a name: {entry!r}")
    return normalise_name(name.removesuffix(".weight"))


def match_to_bundle(updates: Mapping[str, LayerUpdate],
                    manifest_layers: Sequence[Any]) -> dict[int, LayerUpdate]:
    """Map updates to bundle layer ids (positions in ``manifest["layers"]``).

    Entries are module names, manifest dicts or ``BundleLayer`` objects with ``name`` (and
    optionally ``shape`` = ``[out, in]``, checked against the update). VeRA factors wider
    than the layer are sliced to its input size. Every update must find its layer.
    """
    ids = {_layer_name(entry): i for i, entry in enumerate(manifest_layers)}
    unmatched = sorted(name for name in updates if normalise_name(name) not in ids)
    if unmatched:
        raise AdapterError(f"{len(unmatched)} adapter modules have no bundle layer: {unmatched}")
    result: dict[int, LayerUpdate] = {}
    for name, update in updates.items():
        layer_id = ids[normalise_name(name)]
        entry = manifest_layers[layer_id]
        shape = entry.get("shape") if isinstance(entry, Mapping) else getattr(entry, "shape", None)
        if shape is not None:
            update = fit_shapes({name: update}, {name: shape})[name]
        result[layer_id] = update
    return result
