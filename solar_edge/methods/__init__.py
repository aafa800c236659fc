"""Adapter methods: one module per PEFT method, registered here with one line each.

A method module builds a :class:`~solar_edge.methods.base.Method` (how PEFT stores it, how to
carry it exactly, the record kinds it decodes) and is added to :data:`METHODS` below. Nothing
else in the project tests method names: readers, encoders and the device decoder look the
method up here. Adding a method: write ``solar_edge/methods/<name>.py`` with a ``METHOD``,
then one ``register_method`` line.
"""

from __future__ import annotations

from solar_edge.errors import AdapterError
from solar_edge.methods import adalora, lora, tinylora, vera
from solar_edge.methods.base import Adapter, KindDecoder, LayerUpdate, Method

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    if method.name in METHODS:
        raise ValueError(f"adapter method {method.name!r} is registered twice")
    METHODS[method.name] = method


def method_for(peft_type: str) -> Method:
    """The method for PEFT's ``peft_type`` (any case); AdapterError names the supported ones."""
    try:
        return METHODS[peft_type.lower()]
    except KeyError:
        supported = ", ".join(name.upper() for name in METHODS)
        raise AdapterError(f"unsupported adapter type {peft_type!r} (supported: {supported})") \
            from None


def record_decoders() -> dict:
    """Record-kind decoders the registered methods bring (for :mod:`solar_edge.decode`)."""
    out: dict = {}
    for method in METHODS.values():
        out.update(method.record_decoders)
    return out


register_method(lora.METHOD)
register_method(adalora.METHOD)
register_method(vera.METHOD)
register_method(tinylora.METHOD)

__all__ = ["METHODS", "Adapter", "KindDecoder", "LayerUpdate", "Method", "method_for",
           "record_decoders", "register_method"]
