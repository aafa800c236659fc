"""Output-matching refit of a packet's quantised factors (torch, server side).

The allocator (:mod:`solar_edge.encode.allocate`) fits every layer on its own: each record is the
best it can be for *its* layer's weighted error. What a device serves is the whole model,
and per-layer errors add up and interact. This step keeps the packet's structure fixed
(which layers, rank, bit width, group size, plain or W0-basis coordinates: so the bytes do
not change) and tunes the record *values* jointly so the compressed model's outputs match
the uncompressed adapter's on unlabelled calibration texts:

    loss = KL(softmax(teacher logits) || softmax(student logits))
           + embed_weight * |unit(pooled_student) - unit(pooled_teacher)|^2

The teacher is the base model plus the adapter's exact ``dW``; labels are never used, so
the refit compresses the adapter's function rather than training a new one. Quantisation
stays in the loop: each value is ``clamp(round(u), -q, q) * s`` with the straight-through
gradient for the rounding, ``u`` in code units and the float16 group scale ``s`` learnt
too (log-parametrised, rounded to float16 in the forward pass). The final codes and scales
are exactly what the forward pass used, and the records keep the v1 wire format.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from solar_edge.decode import decode_factors, decoder_of, shared_state
from solar_edge.errors import CodecError
from solar_edge.exporters.families.base import TorchModel, mean_pooled, unit
from solar_edge.exporters.heads import Head
from solar_edge.exporters.patches import TorchPatch, base_tensors, patched
from solar_edge.format.bundle import Bundle, LayerBasis
from solar_edge.format.records import CodecHeader, LayerRecord, QuantizedValues, RecordKind


@dataclass(frozen=True)
class RefitConfig:
    steps: int = 120
    batch: int = 16
    lr: float = 0.05            # Adam step, in quantisation codes (values) / log-scale units
    embed_weight: float = 1.0
    max_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch < 1 or not self.lr > 0 or self.embed_weight < 0:
            raise CodecError(f"bad refit settings: {self}")


@dataclass(frozen=True)
class RefitReport:
    records: list[LayerRecord]
    loss_before: float          # on the whole calibration set, quantised start
    loss_after: float
    steps: int


def _refittable(record: LayerRecord) -> bool:
    return (record.kind in (RecordKind.DENSE_FACTORS, RecordKind.FACTORED_CORE)
            and record.values.fmt.is_integer and record.epsilon == 0.0)


class _RecordParams:
    """Learnable codes (``u``) and log-scales of one integer-valued factor record."""

    def __init__(self, record: LayerRecord, basis: LayerBasis | None) -> None:
        import torch

        v = record.values
        self.record = record
        self.q = (1 << (v.fmt.bits - 1)) - 1
        s0 = v.scales.astype(np.float32)
        self.s0 = torch.from_numpy(np.where(s0 > 0, s0, 1.0).astype(np.float32))
        self.live = torch.from_numpy(np.repeat(s0 > 0, v.group_size)[: v.count])
        self.u = torch.nn.Parameter(torch.from_numpy(v.codes.astype(np.float32)))
        self.log_s = torch.nn.Parameter(torch.zeros(self.s0.shape))
        self.U = self.V = None
        if record.kind == RecordKind.FACTORED_CORE:
            if basis is None:
                raise CodecError(f"layer {record.layer_id}: FACTORED_CORE needs its basis")
            self.U = torch.from_numpy(np.ascontiguousarray(basis.U[:, : record.rows]))
            self.V = torch.from_numpy(np.ascontiguousarray(basis.V[:, : record.cols]))

    def scales16(self):
        import torch

        s = self.s0 * torch.exp(self.log_s)
        return s + (s.to(torch.float16).to(torch.float32) - s).detach()

    def values(self):
        import torch

        g = self.record.values.group_size
        s = self.scales16().repeat_interleave(g)[: self.record.values.count]
        z = self.u.clamp(-self.q, self.q)
        z = z + (torch.round(z) - z).detach()
        return torch.where(self.live, z * s, torch.zeros_like(s))

    def factors(self):
        """``(L, Rt)`` with ``dW = L @ Rt.T``, as the device decodes them."""
        r = self.record
        vals = self.values()
        split = r.rows * r.rank
        a, b = vals[:split].reshape(r.rows, r.rank), vals[split:].reshape(r.cols, r.rank)
        if self.U is not None:
            return self.U @ a, self.V @ b
        return a, b

    def to_record(self) -> LayerRecord:
        import torch

        v = self.record.values
        with torch.no_grad():
            scales = self.scales16().to(torch.float16).numpy()
            codes = torch.round(self.u.clamp(-self.q, self.q)).to(torch.int8).numpy()
        codes = np.where(self.live.numpy(), codes, 0).astype(np.int8)
        values = QuantizedValues(v.fmt, v.count, v.group_size, codes=codes,
                                 scales=np.where(v.scales > 0, scales, 0).astype(np.float16))
        r = self.record
        return LayerRecord(r.layer_id, r.kind, r.rows, r.cols, r.rank, values, r.positions,
                           r.variant, r.epsilon)


def _student_parts(records: Sequence[LayerRecord], bases: Mapping[int, LayerBasis],
                   bundle: Bundle) -> tuple[dict[int, _RecordParams], dict[int, TorchPatch]]:
    """Learnable factor records, and every other layer record as a fixed part of a patch."""
    import torch

    params = {r.layer_id: _RecordParams(r, bases.get(r.layer_id)) for r in records
              if _refittable(r)}
    shared = shared_state(records)
    fixed: dict[int, TorchPatch] = {}
    for r in records:
        part = decoder_of(r.kind).part
        if part == "head" or (part == "factors" and r.layer_id in params):
            continue
        value = decode_factors(r, bases.get(r.layer_id), CodecHeader(seed=0), shared.get(r.kind))
        patch = fixed.setdefault(r.layer_id, TorchPatch())
        if part == "factors":
            patch.left, patch.right_t = (torch.from_numpy(np.ascontiguousarray(x)) for x in value)
        elif part == "bias":
            patch.bias = torch.from_numpy(value.copy())
        else:
            patch.magnitude_delta = torch.from_numpy(value.copy())
            patch.w0, patch.b0 = base_tensors(bundle, r.layer_id)
    return params, fixed


def refit_records(model: TorchModel, bundle: Bundle, records: Sequence[LayerRecord],
                  teacher: Mapping[int, TorchPatch], bases: Mapping[int, LayerBasis],
                  inputs: Sequence[Any], head: Head, config: RefitConfig = RefitConfig(),
                  progress: Callable[[int, int, float], None] | None = None,
                  student_head: Head | None = None) -> RefitReport:
    """Records with the same structure and bytes, values tuned to match the adapter's outputs.

    ``model``: the bundle's base model (:func:`~solar_edge.exporters.families.
    open_bundle_model`); ``teacher``: the uncompressed adapter as patches
    (:func:`~solar_edge.exporters.patches.adapter_patches`); ``head``: its task head
    (``(hidden, mask) -> logits``); ``student_head``: the packet's head (default: the same).
    Records that cannot be refitted (sparse cores, float values, perturbed bases, biases,
    magnitudes, head tensors) are carried unchanged and stay in the student as fixed parts."""
    import torch

    if not inputs:
        raise CodecError("refit needs calibration inputs")
    module = model.module
    frozen = [(p, p.requires_grad) for p in module.parameters()]  # restored at the end
    for p, _ in frozen:
        p.requires_grad_(False)
    params, fixed = _student_parts(records, bases, bundle)
    student_head = student_head or head
    lids = sorted(set(teacher) | set(params) | set(fixed))

    def student(lid: int):
        def current() -> TorchPatch:
            base = fixed.get(lid, TorchPatch())
            if lid not in params:
                return base
            left, right_t = params[lid].factors()
            return TorchPatch(left, right_t, base.bias, base.magnitude_delta, base.w0, base.b0)
        return current

    student_patches = {lid: student(lid) for lid in lids}

    def forward(idx, use_teacher: bool):
        feeds = model.feeds([inputs[int(i)] for i in idx], config.max_len)
        with patched(module, bundle, teacher if use_teacher else student_patches):
            hidden, mask = model.hidden(feeds)
        return (head if use_teacher else student_head)(hidden, mask), unit(
            mean_pooled(hidden, mask))

    def loss_of(out, t_logits, t_unit):
        logits, embedding = out
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1),
                                        torch.log_softmax(t_logits, -1), log_target=True,
                                        reduction="batchmean")
        return kl + config.embed_weight * ((embedding - t_unit) ** 2).sum(-1).mean()

    n = len(inputs)
    order = torch.from_numpy(np.argsort([len(str(x)) for x in inputs], kind="stable"))
    chunks = [order[s : s + 64] for s in range(0, n, 64)]
    try:
        with torch.no_grad():
            outs = [forward(c, True) for c in chunks]
            t_logits = torch.empty(n, *outs[0][0].shape[1:])  # decoders: per position
            t_unit = torch.empty(n, outs[0][1].shape[1])
            for c, (logits, embedding) in zip(chunks, outs, strict=True):
                t_logits[c], t_unit[c] = logits, embedding

            def full_loss() -> float:
                total = 0.0
                for c in chunks:
                    total += float(loss_of(forward(c, False), t_logits[c], t_unit[c])) * len(c)
                return total / n

            before = full_loss()
        trainable = [t for p in params.values() for t in (p.u, p.log_s)]
        if config.steps and trainable:
            opt = torch.optim.Adam(trainable, lr=config.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
            gen = torch.Generator().manual_seed(config.seed)
            for step in range(config.steps):
                idx = torch.randint(0, n, (min(config.batch, n),), generator=gen)
                loss = loss_of(forward(idx, False), t_logits[idx], t_unit[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if progress is not None:
                    progress(step + 1, config.steps, float(loss.detach()))
        with torch.no_grad():
            after = full_loss()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    by_layer = {lid: p.to_record() for lid, p in params.items()}
    out = [by_layer[r.layer_id] if _refittable(r) else r for r in records]
    if after > before:  # never hand back something worse than the allocator's records
        out, after = list(records), before
    return RefitReport(out, before, after, config.steps)
