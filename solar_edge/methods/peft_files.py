"""Read a PEFT adapter directory as PEFT writes it (numpy + safetensors, no torch, no pickles).

``adapter_config.json`` names the method (``peft_type``); ``adapter_model.safetensors``
holds its tensors; an optional ``task.json`` (written by the project's training scripts)
adds task name, label names and head seed, PEFT's module order and each module's shape.
The method's reader (:mod:`solar_edge.methods`) folds its scaling into the factors so that
``dW = B @ A`` is exactly what PEFT's ``merge_and_unload`` adds to the base weight.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from solar_edge.errors import AdapterError
from solar_edge.methods import method_for
from solar_edge.methods.base import Adapter
from solar_edge.methods.bfloat16_file import read_bfloat16_file
from solar_edge.methods.matching import fit_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_FILE = "task.json"
MODEL_CONFIG_FILE = "config.json"  # the classifier's config, if saved beside the adapter
MAX_CONFIG_BYTES = 1 << 20
FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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


def _load_tensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.numpy import load_file
    except ImportError as exc:
        raise AdapterError("reading adapters needs the safetensors package") from exc
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own and numpy errors (e.g. bfloat16)
        if "bfloat16" in str(exc):  # numpy has no bfloat16: widened to float32 exactly
            return read_bfloat16_file(path)
        raise AdapterError(f"{path}: cannot read safetensors ({exc})") from exc


def adapter_from_tensors(peft_type: str, config: Mapping[str, Any],
                         tensors: Mapping[str, Any],
                         task_meta: Mapping[str, Any] | None = None) -> Adapter:
    """The adapter from PEFT's config and state dict (pure: no disk)."""
    method = method_for(peft_type)
    try:
        updates, parts, extras = method.read(config, tensors, task_meta or {})
    except KeyError as exc:
        raise AdapterError(f"adapter_config.json lacks {exc}") from exc
    if not updates:
        raise AdapterError("adapter holds no layer updates")
    return Adapter(kind=method.name, config=dict(config), task_meta=dict(task_meta or {}),
                   updates=updates, parts=parts, extras=extras)


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT adapter directory. Raises :class:`AdapterError` on anything unusable."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: not a directory")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        inside = sorted(d.name for d in root.iterdir() if (d / CONFIG_FILE).is_file())
        hint = (f" (adapters saved in its subfolders: {', '.join(inside[:6])}; give one of "
                "them)") if inside else ""
        if not inside and (root / "config.json").is_file() and any(
                (root / f).exists() for f in FULL_MODEL_FILES):
            hint = (" (this looks like a whole model, e.g. after merge_and_unload: give the "
                    "directory that save_pretrained wrote from the PeftModel)")
        raise AdapterError(f"{root}: missing {CONFIG_FILE}{hint}")
    if not weights_path.is_file():
        pickled = (root / "adapter_model.bin").exists()
        hint = (" (a pickled adapter_model.bin is not read: save with "
                "save_pretrained(..., safe_serialization=True))") if pickled else ""
        raise AdapterError(f"{root}: missing {WEIGHTS_FILE}{hint}")
    config = _load_json(config_path)
    meta = _load_json(root / TASK_FILE) if (root / TASK_FILE).is_file() else {}
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterError(f"{config_path}: no peft_type")
    adapter = adapter_from_tensors(peft_type, config, _load_tensors(weights_path), meta)
    if (root / MODEL_CONFIG_FILE).is_file():
        adapter = replace(adapter, model_config=_load_json(root / MODEL_CONFIG_FILE))
    shapes = meta.get("module_shapes")
    if isinstance(shapes, Mapping):
        adapter = replace(adapter, updates=fit_shapes(adapter.updates, shapes))
    return adapter
