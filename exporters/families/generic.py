"""Family ``generic``: any ``nn.Module`` built by a ``module:function`` (export only).

``function()`` returns ``(nn.Module, {input name: tensor})``; the graph output is the
module's first tensor output (``last_hidden_state`` if it has one). Nothing is known of its
inputs' meaning, so the server-side steps that run a model on data (calibration, refit)
are not available for it; the board feeds such a graph arrays, not texts.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from solar_edge.errors import ExportError

from .base import LoadedModel

NAME = "generic"


def load_for_export(spec: str) -> LoadedModel:
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
        "family": NAME,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    with torch.no_grad():
        out = model(**inputs)
    output_name = "last_hidden_state" if hasattr(out, "last_hidden_state") else "output"
    return LoadedModel(model, dict(inputs), identity, output_name, [])
