"""PEFT TinyLoRA (and LoRA-XS, trained as TinyLoRA with standard-basis projections).

``dW = B_svd @ R @ A_svd`` with ``R = sum_i v_i P_i``: the frozen SVD factors and the
projections must be saved. Which ``v`` a module uses depends on PEFT's module order, taken
from ``task.json["module_order"]`` when present, else inferred for BERT-style names.

The frozen factors are the top-``r`` singular vectors of ``W0``, which the bundle stores, so
the adapter is carried exactly and coefficient-only: ``dW`` projected on those vectors is an
``r x r`` core, sent as a dense SPARSE_CORE record over the first ``r x r`` basis cells.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from solar_edge.encode.quant import quantize
from solar_edge.errors import AdapterError
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.records import LayerRecord, RecordKind, ValueFormat
from solar_edge.methods.base import Adapter, Extras, LayerUpdate, Method, Tensors
from solar_edge.methods.tensors import (
    PEFT_PREFIX,
    checked_update,
    group,
    per_module,
    reject_unknown,
    require,
    split_extras,
)

SUFFIXES = ("tinylora_A", "tinylora_B", "tinylora_P")
# Order of BERT submodules inside one encoder layer, as ``named_modules`` visits them.
_BERT_ORDER = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "intermediate.dense", "output.dense")


def bert_module_order(names: Iterable[str]) -> list[str]:
    """Order in which ``named_modules`` visits BERT-style modules (layer index numerically)."""
    def key(name: str) -> tuple[int, int, str]:
        m = re.search(r"layer\.(\d+)\.(.+)$", name)
        if not m or m.group(2) not in _BERT_ORDER:
            raise AdapterError(f"cannot infer PEFT's module order for {name!r}; "
                               "give task.json a 'module_order' list")
        return int(m.group(1)), _BERT_ORDER.index(m.group(2)), name

    return sorted(names, key=key)


def read(config: Mapping[str, Any], tensors: Tensors,
         task_meta: Mapping[str, Any]) -> tuple[dict[str, LayerUpdate], None, Extras]:
    tensors, extras = split_extras(config, tensors)
    modules = per_module(tensors)
    reject_unknown(modules, SUFFIXES)
    groups = group(modules, SUFFIXES)
    vectors = {k.rsplit(".", 1)[1]: np.asarray(v, dtype=np.float32) for k, v in tensors.items()
               if not k.startswith(PEFT_PREFIX) and ".tinylora_v." in k}
    module_order: Sequence[str] | None = task_meta.get("module_order")
    order = list(module_order) if module_order is not None else bert_module_order(groups)
    if sorted(order) != sorted(groups):
        raise AdapterError("module_order does not list exactly the adapter's modules")
    n = len(order)
    # PEFT's grouping (tinylora/model.py): layer_idx // group_size, capped at num_groups - 1.
    num_groups = max(1, round(n * (1.0 - float(config.get("weight_tying", 0.0)))))
    group_size = max(1, n // num_groups)
    updates = {}
    for layer_idx, module in enumerate(order):
        A, B, P = require(groups[module], module, SUFFIXES)
        key = str(min(layer_idx // group_size, num_groups - 1))
        if key not in vectors:
            raise AdapterError(f"{module}: missing tinylora_v.{key}")
        v = vectors[key]
        r = A.shape[0]
        if P.shape != (v.shape[0], r, r):
            raise AdapterError(
                f"{module}: projections {P.shape}, expected ({v.shape[0]}, {r}, {r})")
        R = np.einsum("i,ijk->jk", v.astype(np.float64), P.astype(np.float64)).astype(np.float32)
        updates[module] = checked_update(module, B @ R, A)
    return updates, None, extras


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


def carry(adapter: Adapter, updates: Mapping[int, LayerUpdate],
          bases: Mapping[int, LayerBasis], fmt: ValueFormat) -> list[LayerRecord]:
    r = int(adapter.config.get("r", 0))
    if r < 1 or any(r > bases[lid].U.shape[1] for lid in updates):
        raise AdapterError(f"TinyLoRA rank {r} does not fit the bundle's bases")
    return core_records(updates, bases, r, fmt)


METHOD = Method("tinylora", read, carry=carry)
