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
class Extras:
    """What an adapter trains besides its low-rank updates, by base-model-relative name.

    ``head``: tensors of ``modules_to_save`` modules (a task head such as
    ``classifier.weight``), in the adapter's order; ``biases``: trained biases of adapted
    modules (PEFT ``bias="lora_only"|"all"``), whole values; ``magnitudes``: DoRA's
    magnitude vector per module (``use_dora=True``); ``bias_deltas``: what PEFT's
    ``lora_bias=True`` adds to a module's bias (``scaling * lora_B.bias``), on top of its
    trained or base bias."""

    head: dict[str, np.ndarray] = field(default_factory=dict)
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    magnitudes: dict[str, np.ndarray] = field(default_factory=dict)
    bias_deltas: dict[str, np.ndarray] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.head or self.biases or self.magnitudes or self.bias_deltas)


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter as per-layer updates. ``kind`` is PEFT's type in lower case;
    ``extras`` what it trains besides them; ``parts`` whatever the method needs beyond
    (VeRA: its scales and key)."""

    kind: str
    config: dict[str, Any]
    task_meta: dict[str, Any]
    updates: dict[str, LayerUpdate] = field(default_factory=dict)
    parts: Any = None
    extras: Extras = field(default_factory=Extras)
    model_config: dict[str, Any] = field(default_factory=dict)  # config.json saved beside it

    @property
    def is_dora(self) -> bool:
        return bool(self.extras.magnitudes)

    @property
    def labels(self) -> list[str] | None:
        """Label names: the project's task.json, else the saved model config's ``id2label``."""
        if self.task_meta.get("labels"):
            return [str(x) for x in self.task_meta["labels"]]
        id2label = self.model_config.get("id2label")
        if isinstance(id2label, list) and id2label:
            return [str(x) for x in id2label]
        if isinstance(id2label, dict) and id2label:
            try:
                index = {int(k): v for k, v in id2label.items()}
            except (TypeError, ValueError):
                return None
            if sorted(index) != list(range(len(index))):
                return None  # ids with gaps: no name can be trusted for an output
            return [str(index[i]) for i in range(len(index))]
        return None

    def dense(self, name: str) -> np.ndarray:
        u = self.updates[name]
        return u.B @ u.A

    @property
    def label(self) -> str:
        """The project's adapter kind (e.g. ``lora-xs``) when known, else PEFT's type."""
        return str(self.task_meta.get("adapter_kind", self.kind))


@dataclass(frozen=True)
class KindDecoder:
    """How one record kind decodes: ``decode(record, values, basis, header, shared)``.

    ``part`` says what the result is: ``"factors"`` (``(L, Rt)``), ``"bias"``,
    ``"magnitude"`` (vectors of ``out`` values) or ``"head"`` (a ``rows x cols`` tensor)."""

    decode: Callable[[LayerRecord, np.ndarray, LayerBasis | None, CodecHeader, Any], Any]
    needs_basis: bool
    prepare: Callable[[Sequence[LayerRecord]], Any] | None = None  # per-packet shared state
    part: str = "factors"


Reader = Callable[[Mapping[str, Any], Tensors, Mapping[str, Any]],
                  tuple[dict[str, LayerUpdate], Any, Extras]]
Carrier = Callable[[Adapter, Mapping[int, LayerUpdate], Mapping[int, "LayerBasis"], ValueFormat],
                   list[LayerRecord]]


@dataclass(frozen=True)
class Method:
    """One adapter method. ``read(config, tensors, task_meta) -> (updates, parts, extras)``
    parses PEFT's saved tensors (pure); ``carry`` builds exact coefficient-only records."""

    name: str                      # PEFT's peft_type in lower case
    read: Reader
    carry: Carrier | None = None
    record_decoders: Mapping[RecordKind, KindDecoder] = field(default_factory=dict)
