"""Task heads on the board, built from a packet: its metadata, its HEAD_TENSOR records, and
base tensors the bundle carries (``head_parts``, e.g. BERT's pooler).

* a trained head (metadata ``head``, e.g. PEFT's ``modules_to_save`` classifier):
  ``logits = pool(hidden) [-> tanh(pooler)] @ W.T + b`` with ``pooling`` ``"cls"`` (the
  first position) or ``"mean"`` (attention-masked mean);
* the project's seeded head (``labels`` + ``head_seed``, regenerated with the PRNG by
  :func:`solar_edge.regen.heads.task_head`): ``LOGIT_SCALE * unit(mean) @ H.T``.

A packet without a head serves embeddings: the unit-length masked mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from solar_edge.errors import RuntimeApplyError
from solar_edge.regen.heads import LOGIT_SCALE, task_head


def erf(x: np.ndarray) -> np.ndarray:
    """The error function in float64 from numpy alone (Abramowitz and Stegun 7.1.26,
    absolute error below 1.5e-7), for the exact GELU of ELECTRA's head."""
    z = np.abs(np.asarray(x, np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (
        -1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-z * z))


def gelu(x: np.ndarray) -> np.ndarray:
    """``x * Phi(x)`` (the erf form, as torch's default GELU)."""
    return (0.5 * x * (1.0 + erf(np.asarray(x) / np.sqrt(2.0)))).astype(np.asarray(x).dtype)


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0), "gelu": gelu,
    "identity": lambda x: x}


def unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the embedding a model serves without a head)."""
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return (features / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def pool(hidden: np.ndarray, mask: np.ndarray | None, how: str = "mean") -> np.ndarray:
    """``(batch, seq, hidden) -> (batch, hidden)``: masked mean, or the first position."""
    if hidden.ndim == 2:
        return hidden.astype(np.float32)
    if how == "cls":
        return hidden[:, 0].astype(np.float32)
    m = (np.ones(hidden.shape[:2], np.float32) if mask is None
         else mask.astype(np.float32))[..., None]
    summed = (hidden.astype(np.float32) * m).sum(axis=1)
    return summed / np.maximum(m.sum(axis=1), np.float32(1e-9))


def embedding(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return unit(pool(hidden, mask, "mean"))


class Head(Protocol):
    @property
    def labels(self) -> list[str]: ...

    def logits(self, hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray: ...


@dataclass(frozen=True)
class SeededHead:
    labels: list[str]
    weight: np.ndarray  # (num_labels, hidden)

    def logits(self, hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        features = unit(pool(hidden, mask, "mean"))
        return (np.float32(LOGIT_SCALE) * features @ self.weight.T).astype(np.float32)


@dataclass(frozen=True)
class ClassifierHead:
    labels: list[str]
    weight: np.ndarray                    # (num_labels, hidden)
    bias: np.ndarray | None
    pooling: str = "cls"
    pooler: tuple[np.ndarray, np.ndarray | None] | None = None
    activation: str = "tanh"

    def logits(self, hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        x = pool(hidden, mask, self.pooling)
        if self.pooler is not None:
            w, b = self.pooler
            x = ACTIVATIONS[self.activation](x @ w.T + (0 if b is None else b))
        out = x @ self.weight.T + (0 if self.bias is None else self.bias)
        return out.astype(np.float32)


def _tensor(name: str | None, carried: Mapping[str, np.ndarray],
            base_part: Callable[[str], np.ndarray | None]) -> np.ndarray | None:
    if name is None:
        return None
    if name in carried:
        return carried[name]
    return base_part(name)


def _check_linear(what: str, weight: np.ndarray, bias: np.ndarray | None, width: int) -> None:
    """A head layer must read ``width`` features: checked before anything runs, so that a
    packet made for another model is a typed error, not numpy's."""
    if weight.ndim != 2 or weight.shape[1] != width:
        raise RuntimeApplyError(f"head: {what} weight of shape {list(weight.shape)} does not read "
                                f"this bundle's {width} features: the packet is for another "
                                "model")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise RuntimeApplyError(f"head: {what} bias of shape {list(bias.shape)} for "
                                f"{weight.shape[0]} outputs")


def trained_head(spec: Mapping[str, Any], labels: list[str], tensors: Mapping[int, np.ndarray],
                 base_part: Callable[[str], np.ndarray | None],
                 hidden: int | None = None) -> ClassifierHead:
    """The head a packet's metadata ``head`` describes, from its tensors and the bundle's;
    with ``hidden``, every layer's width is checked against the bundle's hidden states."""
    declared = spec["tensors"]
    carried = {t["name"]: tensors[i].reshape(t["shape"]) for i, t in enumerate(declared)
               if i in tensors}
    weight = _tensor(spec.get("weight"), carried, base_part)
    if weight is None or weight.ndim != 2 or weight.shape[0] != len(labels):
        raise RuntimeApplyError(f"head: weight {spec.get('weight')!r} missing or not "
                                f"{len(labels)} x hidden")
    bias = _tensor(spec.get("bias"), carried, base_part)
    pooler = None
    if spec.get("pooler"):
        prefix = str(spec["pooler"])
        w = _tensor(prefix + ".weight", carried, base_part)
        if w is None:
            raise RuntimeApplyError(f"head: pooler {prefix!r} is neither in the packet nor "
                                    "in the bundle (head_parts)")
        pooler = (w, _tensor(prefix + ".bias", carried, base_part))
        if hidden is not None:
            _check_linear(f"pooler {prefix!r}", *pooler, hidden)
    if hidden is not None:
        _check_linear(repr(spec.get("weight")), weight, bias,
                      hidden if pooler is None else int(pooler[0].shape[0]))
    activation = str(spec.get("activation", "tanh"))
    if activation not in ACTIVATIONS or spec.get("pooling", "cls") not in ("cls", "mean"):
        raise RuntimeApplyError(f"head: unknown activation or pooling in {dict(spec)}")
    return ClassifierHead(labels, weight, bias, str(spec.get("pooling", "cls")), pooler,
                          activation)


def head_from_packet(metadata: Mapping[str, Any], tensors: Mapping[int, np.ndarray], hidden: int,
                     base_part: Callable[[str], np.ndarray | None]) -> Head | None:
    labels = [str(x) for x in metadata.get("labels") or []]
    if "head" in metadata:
        return trained_head(metadata["head"], labels, tensors, base_part, hidden)
    if labels and "head_seed" in metadata:
        return SeededHead(labels, task_head(int(metadata["head_seed"]), len(labels), hidden))
    return None
