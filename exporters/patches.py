"""An adapter applied to a torch model through forward hooks, as the board serves it.

A layer's patched output is ``y = s * ((W0 + dW) x) + b0 + db`` (``runtime/patching.py``):
low-rank ``dW = L @ Rt.T``, a bias delta ``db`` and, for DoRA, a row scale
``s = (|W0|_row + d) / |W0 + dW|_row``. The hook computes it from the module's own output
``W0 x + b0``, so the base weights are never modified and gradients flow to whatever the
patch is made of (the refit's learnt values). Used for the teacher (the uncompressed
adapter) and the student (a packet) in calibration and the refit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from solar_edge.format.bundle import Bundle
from solar_edge.methods.base import LayerUpdate


@dataclass
class TorchPatch:
    """One layer's change in torch. ``magnitude_delta`` needs ``w0`` (out x in) and ``b0``."""

    left: torch.Tensor | None = None       # out x k
    right_t: torch.Tensor | None = None    # in x k
    bias: torch.Tensor | None = None       # out
    magnitude_delta: torch.Tensor | None = None
    w0: torch.Tensor | None = None
    b0: torch.Tensor | None = None

    def row_scale(self) -> torch.Tensor:
        assert self.w0 is not None and self.magnitude_delta is not None
        w0 = self.w0.double()
        sq = (w0 * w0).sum(dim=1)
        base = sq.sqrt()
        if self.left is not None:
            left, right_t = self.left.double(), self.right_t.double()  # type: ignore[union-attr]
            sq = sq + 2 * ((w0 @ right_t) * left).sum(1) + ((left @ (right_t.T @ right_t))
                                                           * left).sum(1)
        return ((base + self.magnitude_delta.double()) / sq.clamp_min(1e-30).sqrt()).float()

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        y = out
        if self.magnitude_delta is not None and self.b0 is not None:
            y = y - self.b0
        if self.left is not None and self.right_t is not None:
            y = y + (x @ self.right_t) @ self.left.T
        if self.magnitude_delta is not None:
            y = y * self.row_scale()
            if self.b0 is not None:
                y = y + self.b0
        if self.bias is not None:
            y = y + self.bias
        return y


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.array(a, np.float32))  # a writable copy


def base_tensors(bundle: Bundle, lid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    b0 = bundle.base_bias(lid)
    w0 = torch.from_numpy(np.array(bundle.base_weight(lid), np.float32))  # a copy: writable
    return w0, _t(None if b0 is None else np.array(b0, np.float32))


def adapter_patches(bundle: Bundle, updates: Mapping[int, LayerUpdate],
                    biases: Mapping[int, np.ndarray] | None = None,
                    magnitudes: Mapping[int, np.ndarray] | None = None) -> dict[int, TorchPatch]:
    """The uncompressed adapter as patches: factors, bias deltas (``trained - b0``) and DoRA
    magnitude deltas (``m - |W0|_row``), exact."""
    biases, magnitudes = biases or {}, magnitudes or {}
    out: dict[int, TorchPatch] = {}
    for lid in sorted(set(updates) | set(biases) | set(magnitudes)):
        patch = TorchPatch()
        if lid in updates:
            u = updates[lid]
            patch.left, patch.right_t = _t(u.B), _t(np.ascontiguousarray(u.A.T))
        w0, b0 = base_tensors(bundle, lid)
        if lid in biases:
            base = np.zeros(w0.shape[0], np.float32) if b0 is None else b0.numpy()
            patch.bias = _t(biases[lid] - base)
        if lid in magnitudes:
            norms = np.sqrt((np.asarray(bundle.base_weight(lid), np.float64) ** 2).sum(1))
            patch.magnitude_delta = _t((magnitudes[lid] - norms).astype(np.float32))
            patch.w0, patch.b0 = w0, b0
        out[lid] = patch
    return out


@contextmanager
def patched(module: torch.nn.Module, bundle: Bundle,
            patches: Mapping[int, TorchPatch | Callable[[], TorchPatch]],
            on_output: Callable[[int, torch.Tensor], Any] | None = None) -> Iterator[None]:
    """Forward hooks applying ``patches`` (a patch, or a callable giving the current one) to
    their layers for the block; ``on_output(lid, y)`` sees each patched output."""
    modules = dict(module.named_modules())

    def hook_for(lid: int, patch: TorchPatch | Callable[[], TorchPatch]):
        def hook(_mod, args, out):
            p = patch() if callable(patch) else patch
            y = p.apply(args[0], out)
            if on_output is not None:
                on_output(lid, y)
            return y
        return hook

    handles = [modules[bundle.layer(lid).name].register_forward_hook(hook_for(lid, p))
               for lid, p in patches.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
