"""Training-time relatives carried exactly and coefficient-only, no fitting.

Some adapters already live in a basis the device can regenerate (LoRA-XS / TinyLoRA: the
top-``r`` singular vectors of ``W0``; VeRA: projections drawn from a seed), so a packet can
carry just their trained numbers. Which methods can, and how, is each method's ``carry``
(:mod:`solar_edge.methods`); any other adapter (LoRA, DoRA, AdaLoRA) travels as its own
factors at float32 or float16, which is exact too but not coefficient-only.
:func:`exact_records` checks that the carried records reproduce the adapter's ``dW``
(relative error below the format's tolerance) and raises :class:`AdapterError` when they do
not (an adapter not built on this bundle's base).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from solar_edge.decode import factors_by_layer
from solar_edge.encode.baselines import own_factor_records
from solar_edge.errors import AdapterError
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.records import CodecHeader, LayerRecord, ValueFormat
from solar_edge.methods import method_for
from solar_edge.methods.base import Adapter, LayerUpdate

EXACT_TOLERANCE = {ValueFormat.FLOAT32: 1e-4, ValueFormat.FLOAT16: 1e-2}  # relative error


def carried_error(records: list[LayerRecord], updates: Mapping[int, LayerUpdate],
                  bases: Mapping[int, LayerBasis]) -> float:
    """Relative Frobenius error ``|dW - dW_carried| / |dW|`` over all layers."""
    num = den = 0.0
    for lid, (L, Rt) in factors_by_layer(records, CodecHeader(seed=0), bases).items():
        u = updates[lid]
        dw = u.B.astype(np.float64) @ u.A.astype(np.float64)
        num += float(((L.astype(np.float64) @ Rt.T.astype(np.float64) - dw) ** 2).sum())
        den += float((dw**2).sum())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def exact_records(adapter: Adapter, updates: Mapping[int, LayerUpdate],
                  bases: Mapping[int, LayerBasis],
                  fmt: ValueFormat = ValueFormat.FLOAT32) -> tuple[list[LayerRecord], float]:
    """Coefficient-only records carrying ``adapter`` (layers matched to the bundle) and their
    measured relative error."""
    if fmt not in EXACT_TOLERANCE:
        raise AdapterError("exact carrying keeps float32 or float16 values")
    method = method_for(adapter.kind)
    if method.carry is None:  # no regenerable basis: its own factors, unquantised
        records = own_factor_records(updates, fmt)
    else:
        records = method.carry(adapter, updates, bases, fmt)
    error = carried_error(records, updates, bases)
    bound = EXACT_TOLERANCE[fmt]
    if not error <= bound:
        raise AdapterError(f"carrying this {adapter.kind} adapter exactly leaves relative error "
                           f"{error:.3g} > {bound:g}: its frozen factors are not this bundle's "
                           "basis (another base model, or a truncated basis)")
    return records, error
