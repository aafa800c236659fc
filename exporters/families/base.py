"""What a model family provides on the server side (torch), and the shapes it hands around.

A family (a BERT-style text encoder, a decoder LM, a vision transformer, any ``nn.Module``
built by a ``module:function``) knows how to load its models, make example inputs for the
graph exporters, turn raw inputs (texts, images) into feeds, and compute the features a task
head reads. It is one module under :mod:`solar_edge.exporters.families`, registered with
one line there; the bundle manifest records its name (``model.family``) so that the
server-side steps that run the model (calibration, refit) and the board's runtime family
(:mod:`solar_edge.runtime.families`) pick the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from solar_edge.errors import ExportError
from solar_edge.format.bundle import Bundle


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
    """A model ready to export: the torch module, example inputs, its identity and family."""

    model: nn.Module
    example_inputs: dict[str, torch.Tensor]
    identity: dict[str, Any]
    output_name: str = "last_hidden_state"
    tokenizer_files: list[Path] = field(default_factory=list)
    head_parts: dict[str, np.ndarray] = field(default_factory=dict)  # base tensors heads use
    canary_inputs: list[Any] = field(default_factory=list)  # fixed inputs packets vouch for
    supports_tflite: bool = True  # False: the family's graph has no TFLite conversion

    @property
    def input_names(self) -> list[str]:
        return list(self.example_inputs)

    @property
    def output_names(self) -> list[str]:
        """Graph outputs, in the order the wrapper returns them (the first is compared)."""
        return [self.output_name]

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


class TorchModel(Protocol):
    """A bundle's base model opened for the server-side steps that run it."""

    module: nn.Module  # module names are the bundle manifest's layer names
    hidden_size: int   # width of :meth:`features`

    def feeds(self, inputs: Sequence[Any], max_len: int) -> dict[str, torch.Tensor]:
        """Raw inputs (texts, ...) -> one padded batch of graph feeds."""
        ...

    def token_mask(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(batch, positions)`` bool: which positions carry real input (no padding)."""
        ...

    def hidden(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, positions, hidden)`` states and the ``(batch, positions)`` mask heads
        pool (:mod:`solar_edge.exporters.heads`)."""
        ...


def unit(features: torch.Tensor) -> torch.Tensor:
    """Features scaled to unit length (e.g. the sentence embedding of a text encoder)."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over positions: ``(batch, seq, hidden) -> (batch, hidden)``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def check_matches_bundle(module: nn.Module, bundle: Bundle, layer_ids: Sequence[int]) -> None:
    """The torch model must be the bundle's base: its adapted weights equal the bundle's W0."""
    from solar_edge.exporters.targets import weight_out_in

    modules = dict(module.named_modules())
    for lid in layer_ids:
        name = bundle.layer(lid).name
        mod = modules.get(name)
        want = np.asarray(bundle.base_weight(lid), np.float32)
        got = None if mod is None else weight_out_in(mod)
        if got is None or got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
            raise ExportError(f"layer {lid} ({name}): the torch model is not the bundle's base "
                              "model (its weights differ from the bundle's)")
