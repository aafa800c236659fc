"""What an adapter method provides, and the shapes every method hands to the encoders.

A method (PEFT LoRA, AdaLoRA, VeRA, TinyLoRA, ...) is one module under
:mod:`solar_edge.methods` that builds a :class:`Method` and is registered with one line in
``solar_edge/methods/__init__.py``. It knows how PEFT stores the method (``read``), how to
carry it exactly when the device can regenerate its frozen parts (``carry``), and how to
decode any record kind it brings (``record_decoders``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from solar_edge.format.records import CodecHeader, LayerRecord, RecordKind, ValueFormat

if TYPE_CHECKING:
    from solar_edge.format.bundle import LayerBasis

Factors = tuple[np.ndarray, np.ndarray]  # (L: out x k, Rt: in x k), dW = L @ Rt.T
Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's update ``dW = B @ A`` (``B``: out x r, ``A``: r x in), scaling folded in."""

    name: str
    B: np.ndarray
    A: np.ndarray


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter as per-layer updates. ``kind`` is PEFT's type in lower case;
    ``parts`` is whatever the method needs beyond the updates (VeRA: its scales and key)."""

    kind: str
    config: dict[str, Any]
    task_meta: dict[str, Any]
    updates: dict[str, LayerUpdate] = field(default_factory=dict)
    parts: Any = None

    def dense(self, name: str) -> np.ndarray:
        u = self.updates[name]
        return u.B @ u.A

    @property
    def label(self) -> str:
        """The project's adapter kind (e.g. ``lora-xs``) when known, else PEFT's type."""
        return str(self.task_meta.get("adapter_kind", self.kind))


@dataclass(frozen=True)
class KindDecoder:
    """How one record kind decodes: ``decode(record, values, basis, header, shared)``."""

    decode: Callable[[LayerRecord, np.ndarray, LayerBasis | None, CodecHeader, Any], Factors]
    needs_basis: bool
    prepare: Callable[[Sequence[LayerRecord]], Any] | None = None  # per-packet shared state


Reader = Callable[[Mapping[str, Any], Tensors, Mapping[str, Any]], tuple[dict[str, LayerUpdate],
                                                                       Any]]
Carrier = Callable[[Adapter, Mapping[int, LayerUpdate], Mapping[int, "LayerBasis"], ValueFormat],
                   list[LayerRecord]]


@dataclass(frozen=True)
class Method:
    """One adapter method. ``read(config, tensors, task_meta) -> (updates, parts)`` parses
    PEFT's saved tensors (pure); ``carry`` builds exact coefficient-only records, if any."""

    name: str                      # PEFT's peft_type in lower case
    read: Reader
    carry: Carrier | None = None
    record_decoders: Mapping[RecordKind, KindDecoder] = field(default_factory=dict)
