"""Training-time relatives carried exactly and coefficient-only, no fitting.

Some adapters already live in a basis the device can regenerate, so a packet can carry
just their trained numbers:

* LoRA-XS / TinyLoRA (PEFT ``tinylora``): ``dW = U_r R V_r^T`` with frozen ``U_r``, ``V_r`` the
  top-``r`` singular vectors of ``W0``, which the bundle stores. The ``r x r`` core ``R`` goes
  as a dense SPARSE_CORE record over the first ``r x r`` cells of the bundle basis.
* VeRA: its scaling vectors as VERA_SCALES records (:mod:`solar_edge.vera`).

:func:`exact_records` checks that the carried records reproduce the adapter's ``dW``
(relative error below ``tolerance`` in float32) and raises :class:`AdapterError` for any
other kind, or when the adapter was not built on this bundle's base.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from solar_edge.basis import LayerBasis
from solar_edge.codec import LayerUpdate, decode_factors
from solar_edge.errors import AdapterError
from solar_edge.quant import quantize
from solar_edge.records import CodecHeader, LayerRecord, RecordKind, ValueFormat
from solar_edge.vera import carry_records, projections_for

EXACT_TOLERANCE = {ValueFormat.FLOAT32: 1e-4, ValueFormat.FLOAT16: 1e-2}  # relative error


def core_records(updates: Mapping[int, LayerUpdate], bases: Mapping[int, LayerBasis], r: int,
                 fmt: ValueFormat = ValueFormat.FLOAT32) -> list[LayerRecord]:
    """``dW`` projected on the top-``r`` singular vectors of W0: an ``r x r`` SPARSE_CORE."""
    records = []
    for lid, u in sorted(updates.items()):
        ur = bases[lid].U[:, :r].astype(np.float64)
        vr = bases[lid].V[:, :r].astype(np.float64)
        core = (ur.T @ u.B) @ (u.A @ vr)
        records.append(LayerRecord(lid, RecordKind.SPARSE_CORE, r, r, 0,
                                   quantize(core.reshape(-1), fmt, 64),
                                   positions=np.arange(r * r, dtype=np.uint32)))
    return records


def carried_error(records: list[LayerRecord], updates: Mapping[int, LayerUpdate],
                  bases: Mapping[int, LayerBasis]) -> float:
    """Relative Frobenius error ``|dW - dW_carried| / |dW|`` over all layers."""
    proj = projections_for(records)
    num = den = 0.0
    for rec in records:
        u = updates[rec.layer_id]
        basis = None if rec.kind == RecordKind.VERA_SCALES else bases[rec.layer_id]
        L, Rt = decode_factors(rec, basis, CodecHeader(seed=0), proj)
        dw = u.B.astype(np.float64) @ u.A.astype(np.float64)
        num += float(((L.astype(np.float64) @ Rt.T.astype(np.float64) - dw) ** 2).sum())
        den += float((dw**2).sum())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def exact_records(adapter, updates: Mapping[int, LayerUpdate],
                  bases: Mapping[int, LayerBasis],
                  fmt: ValueFormat = ValueFormat.FLOAT32) -> tuple[list[LayerRecord], float]:
    """Coefficient-only records carrying ``adapter`` (read by ``read_adapter``, layers matched
    to the bundle) and their measured relative error."""
    if fmt not in (ValueFormat.FLOAT32, ValueFormat.FLOAT16):
        raise AdapterError("exact carrying keeps float32 or float16 values")
    if adapter.kind == "vera":
        records = carry_records(adapter.vera, updates, fmt)
    elif adapter.kind == "tinylora":
        r = int(adapter.config.get("r", 0))
        if r < 1 or any(r > bases[lid].U.shape[1] for lid in updates):
            raise AdapterError(f"TinyLoRA rank {r} does not fit the bundle's bases")
        records = core_records(updates, bases, r, fmt)
    else:
        raise AdapterError(f"a {adapter.kind} adapter has no regenerable basis to carry it "
                           "exactly; compress it with a budget or an error bound instead")
    error = carried_error(records, updates, bases)
    bound = EXACT_TOLERANCE[fmt]
    if not error <= bound:
        raise AdapterError(f"carrying this {adapter.kind} adapter exactly leaves relative error "
                           f"{error:.3g} > {bound:g}: its frozen factors are not this bundle's "
                           "basis (another base model, or a truncated basis)")
    return records, error
