"""Which weights of a torch model are adaptable (PEFT ``target_modules`` rules), and reading them.

Module names are relative to the base model (PEFT style, e.g.
``encoder.layer.0.attention.self.query``). Adaptable modules are ``nn.Linear`` and
transformers' ``Conv1D`` (GPT-2; its weight is stored ``in x out``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from solar_edge.errors import ExportError
from solar_edge.methods.matching import HEAD_PARTS


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
