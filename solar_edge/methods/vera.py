"""VeRA carried exactly and coefficient-only: the device regenerates PEFT's shared projections.

PEFT's VeRA adds ``dW = diag(lambda_b) P_B[:out] diag(lambda_d) P_A[:, :in]`` to each targeted
layer; only the scaling vectors are trained. The shared projections ``P_A`` (``r x max_in``)
and ``P_B`` (``max_out x r``, maxima over the targeted layers) are drawn once from
``torch.Generator().manual_seed(key)``: ``P_A`` first, then ``P_B``, each Kaiming-uniform,
``U(-bound, bound)`` with ``bound = sqrt(3) * sqrt(2) / sqrt(fan_in)`` (``fan_in`` = its
number of columns).

torch's CPU generator is MT19937 (``init_genrand(key)``); ``uniform_`` on float32 takes one
32-bit output ``u`` per value and returns ``float32(x * float32(to - from) + float32(from))``
with ``x = (u & (2**24 - 1)) * 2**-24``, one rounding (the multiply-add is fused on the
builds measured). Every intermediate here is exact in float64 (the product has at most 48
significant bits and the sum stays below 2**49 units of the smallest term), so one
rounding to float32 reproduces it on any platform. The raw MT19937 stream comes from
numpy's legacy-seeded ``MT19937`` bit generator, whose stream numpy keeps frozen.

A packet carries one ``VERA_SCALES`` record per targeted layer: ``values = lambda_b`` then
``lambda_d``, ``variant = key`` (so keys are limited to u16), ``rank = r``. The projections are
regenerated once per packet (:func:`projections_for`) and sliced per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from solar_edge.encode.quant import quantize
from solar_edge.errors import AdapterError, CodecError
from solar_edge.format.packet import PacketLimits
from solar_edge.format.records import LayerRecord, RecordKind, ValueFormat
from solar_edge.methods.base import (
    Adapter,
    Extras,
    KindDecoder,
    LayerUpdate,
    Method,
    Tensors,
)
from solar_edge.methods.tensors import (
    PEFT_PREFIX,
    checked_update,
    group,
    per_module,
    reject_unknown,
    require,
    split_extras,
)

MAX_KEY = 0xFFFF


def _mt19937(key: int) -> np.random.MT19937:
    if not 0 <= key < 2**32:
        raise CodecError(f"MT19937 key must be a u32, got {key}")
    bitgen = np.random.MT19937()
    bitgen.state = np.random.RandomState(key).get_state(legacy=False)  # type: ignore[assignment]
    return bitgen


def mt19937_raw(key: int, count: int) -> np.ndarray:
    """The first ``count`` raw 32-bit MT19937 outputs (as uint64) for ``init_genrand(key)``."""
    return np.asarray(_mt19937(key).random_raw(count), np.uint64)


def _uniform(raw: np.ndarray, fan_in: int) -> np.ndarray:
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))
    low = np.float64(np.float32(-bound))
    span = np.float64(np.float32(bound) - np.float32(-bound))
    x = (raw & np.uint64((1 << 24) - 1)).astype(np.float64) * 2.0**-24
    return (x * span + low).astype(np.float32)


def kaiming_uniform(raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """torch's ``uniform_(-bound, bound)`` on float32 from raw 32-bit outputs (see module)."""
    return _uniform(raw, shape[1]).reshape(shape)


_CHUNK = 1 << 16  # raw outputs converted at a time: the float64 temporaries stay ~1.5 MiB
MAX_PROJECTION_VALUES = PacketLimits().max_projection_values


def _draw(bitgen: np.random.MT19937, shape: tuple[int, int]) -> np.ndarray:
    """The next ``shape`` Kaiming-uniform float32 values, converted chunk by chunk (the
    stream is the same as one long draw: the generator's state carries over)."""
    out = np.empty(shape[0] * shape[1], np.float32)
    for start in range(0, out.size, _CHUNK):
        n = min(_CHUNK, out.size - start)
        out[start : start + n] = _uniform(np.asarray(bitgen.random_raw(n), np.uint64), shape[1])
    return out.reshape(shape)


@dataclass(frozen=True)
class VeraProjections:
    """``A`` (``rank x max_in``) and ``B`` (``max_out x rank``), float32, as PEFT draws them."""

    key: int
    A: np.ndarray
    B: np.ndarray

    @classmethod
    def generate(cls, key: int, rank: int, max_out: int, max_in: int,
                 max_values: int = MAX_PROJECTION_VALUES) -> VeraProjections:
        """Checked before any PRNG work: the key, the shape, and ``rank * (max_out + max_in)``
        against ``max_values`` (the packet limit ``max_projection_values``); memory is the
        4 bytes per value of the result plus one chunk."""
        if not 0 <= key <= MAX_KEY:
            raise CodecError(f"VeRA projection key {key} does not fit in u16")
        if min(rank, max_out, max_in) < 1:
            raise CodecError(f"bad VeRA projection shape r={rank}, {max_out}x{max_in}")
        if rank * (max_out + max_in) > max_values:
            raise CodecError(f"VeRA projections r={rank}, {max_out}x{max_in} would be "
                             f"{rank * (max_out + max_in)} values, above the limit {max_values}")
        bitgen = _mt19937(key)
        a = _draw(bitgen, (rank, max_in))
        b = _draw(bitgen, (max_out, rank))
        return cls(key, a, b)


def projections_for(records: Sequence[LayerRecord]) -> VeraProjections | None:
    """The projections a packet's VERA_SCALES records share (None when it has none)."""
    vera = [r for r in records if r.kind == RecordKind.VERA_SCALES]
    if not vera:
        return None
    shared = {(r.rank, r.variant) for r in vera}
    if len(shared) != 1:
        raise CodecError(f"VERA_SCALES records disagree on (rank, key): {sorted(shared)}")
    rank, key = shared.pop()
    return VeraProjections.generate(key, rank, max(r.rows for r in vera),
                                    max(r.cols for r in vera))


def decode_vera(record: LayerRecord, values: np.ndarray, basis: object, header: object,
                proj: VeraProjections | None) -> tuple[np.ndarray, np.ndarray]:
    """``(L, Rt)`` with ``dW = L @ Rt.T = diag(b) B[:rows] diag(d) A[:, :cols]``."""
    if proj is None:
        raise CodecError(f"layer {record.layer_id}: VERA_SCALES needs the shared projections")
    if (record.rank, record.variant) != (proj.A.shape[0], proj.key) or \
            record.rows > proj.B.shape[0] or record.cols > proj.A.shape[1]:
        raise CodecError(f"layer {record.layer_id}: record does not fit the projections")
    b, d = values[: record.rows], values[record.rows :]
    L = (b[:, None] * proj.B[: record.rows]) * d[None, :]
    return L.astype(np.float32), np.ascontiguousarray(proj.A[:, : record.cols].T)


def vera_records(scales: Mapping[int, tuple[np.ndarray, np.ndarray]],
                 shapes: Mapping[int, tuple[int, int]], key: int,
                 fmt: ValueFormat = ValueFormat.FLOAT32) -> list[LayerRecord]:
    """One VERA_SCALES record per layer id: ``scales[lid] = (lambda_b, lambda_d)``,
    ``shapes[lid] = (out, in)``. FLOAT32 carries PEFT's values exactly."""
    if not 0 <= key <= MAX_KEY:
        raise AdapterError(f"VeRA projection_prng_key {key} does not fit the packet's u16")
    records = []
    for lid in sorted(scales):
        lam_b, lam_d = (np.asarray(x, np.float32).reshape(-1) for x in scales[lid])
        out, inp = shapes[lid]
        if lam_b.size != out:
            raise AdapterError(f"layer {lid}: lambda_b has {lam_b.size} values, layer has {out}")
        values = quantize(np.concatenate([lam_b, lam_d]), fmt)
        records.append(LayerRecord(lid, RecordKind.VERA_SCALES, out, inp, lam_d.size, values,
                                   variant=key))
    return records


def check_saved_projections(saved_A: np.ndarray, saved_B: np.ndarray, key: int) -> float:
    """Largest difference between an adapter's saved projections and the regenerated ones.

    Raises :class:`AdapterError` when they are not the same draw (another key, another
    generator, or a torch build whose rounding differs by more than one float32 ulp)."""
    rank, max_in = saved_A.shape
    max_out = saved_B.shape[0]
    proj = VeraProjections.generate(key, rank, max_out, max_in)
    diff = max(float(np.abs(proj.A - saved_A).max()), float(np.abs(proj.B - saved_B).max()))
    ulp = float(np.spacing(np.float32(max(np.abs(saved_A).max(), np.abs(saved_B).max()))))
    if diff > ulp:
        raise AdapterError(f"the adapter's VeRA projections are not the draw of key {key} "
                           f"(max difference {diff:.3g}); it cannot be carried coefficient-only")
    return diff


def carry(adapter: Adapter, updates: Mapping[int, LayerUpdate], bases: object,
          fmt: ValueFormat = ValueFormat.FLOAT32) -> list[LayerRecord]:
    """VERA_SCALES records for a VeRA adapter (``updates`` matched to bundle layer ids).

    The saved projections must be the draw the device will regenerate
    (:func:`check_saved_projections`)."""
    parts = adapter.parts
    if not isinstance(parts, VeraParts):
        raise AdapterError("not a VeRA adapter")
    check_saved_projections(parts.shared_A, parts.shared_B, parts.key)
    scales, shapes = {}, {}
    for lid, upd in updates.items():
        if upd.name not in parts.scales:
            raise AdapterError(f"layer {lid}: no VeRA scales for module {upd.name!r}")
        scales[lid] = parts.scales[upd.name]
        shapes[lid] = (int(upd.B.shape[0]), int(upd.A.shape[1]))
    return vera_records(scales, shapes, parts.key, fmt)


# --- reading PEFT's tensors ----------------------------------------------------------------

@dataclass(frozen=True)
class VeraParts:
    """What a VeRA adapter trains and shares: per-module ``(lambda_b, lambda_d)`` and the saved
    projections with their PEFT ``projection_prng_key``."""

    key: int
    scales: dict[str, tuple[np.ndarray, np.ndarray]]
    shared_A: np.ndarray
    shared_B: np.ndarray


SUFFIXES = ("vera_lambda_b", "vera_lambda_d")


def _shared(tensors: Tensors, name: str) -> np.ndarray:
    keys = [k for k in tensors if not k.startswith(PEFT_PREFIX) and k.endswith(f".{name}")]
    if not keys:
        raise AdapterError(f"VeRA adapter lacks the shared '{name}' tensor; save it with "
                           "save_projection=True (torch's generator is not portable)")
    return np.asarray(tensors[keys[0]], dtype=np.float32)


def read(config: Mapping[str, Any], tensors: Tensors,
         task_meta: Mapping[str, Any]) -> tuple[dict[str, LayerUpdate], VeraParts, Extras]:
    """``dW = (diag(lambda_b) B_shared[:out]) @ (diag(lambda_d) A_shared)``; ``A`` is cut to
    each layer's ``in`` when the layers are matched to a bundle."""
    tensors, extras = split_extras(config, tensors)
    shared_A, shared_B = _shared(tensors, "vera_A"), _shared(tensors, "vera_B")
    modules = per_module(tensors)
    reject_unknown(modules, SUFFIXES)
    r = shared_A.shape[0]
    if shared_A.ndim != 2 or shared_B.ndim != 2 or shared_B.shape[1] != r:
        raise AdapterError(f"VeRA shared shapes A {shared_A.shape}, B {shared_B.shape}")
    updates, scales = {}, {}
    for module, parts in sorted(group(modules, SUFFIXES).items()):
        lam_b, lam_d = require(parts, module, SUFFIXES)
        out = lam_b.shape[0]
        if lam_d.shape != (r,) or out > shared_B.shape[0]:
            raise AdapterError(f"{module}: lambda_d {lam_d.shape}, lambda_b {lam_b.shape} do not "
                               f"fit shared A {shared_A.shape}, B {shared_B.shape}")
        updates[module] = checked_update(module, lam_b[:, None] * shared_B[:out],
                                         lam_d[:, None] * shared_A)
        scales[module] = (lam_b, lam_d)
    key = int(config.get("projection_prng_key", 0))
    return updates, VeraParts(key, scales, shared_A, shared_B), extras


METHOD = Method("vera", read, carry=carry, record_decoders={
    RecordKind.VERA_SCALES: KindDecoder(decode_vera, needs_basis=False, prepare=projections_for),
})
