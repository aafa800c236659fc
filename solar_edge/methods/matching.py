"""An adapter's modules -> a bundle's layer ids, with each update checked against its shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError
from solar_edge.methods.base import Extras, LayerUpdate
from solar_edge.methods.tensors import PEFT_PREFIX, normalise_name


def fit_shapes(updates: Mapping[str, LayerUpdate],
               shapes: Mapping[str, Sequence[int]]) -> dict[str, LayerUpdate]:
    """Check each update against its layer's ``(out, in)``; cut shared factors wider than it.

    VeRA's shared ``A`` spans the widest targeted layer; a narrower layer uses its first
    ``in`` columns.
    """
    fitted = {}
    for name, update in updates.items():
        if name not in shapes:
            raise AdapterError(f"{name}: no shape recorded for this module")
        out, inp = (int(x) for x in shapes[name])
        if update.B.shape[0] != out or update.A.shape[1] < inp:
            raise AdapterError(f"{name}: update {update.B.shape[0]}x{update.A.shape[1]} "
                               f"does not fit layer {out}x{inp}")
        if update.A.shape[1] > inp:
            update = LayerUpdate(update.name, update.B, np.ascontiguousarray(update.A[:, :inp]))
        fitted[name] = update
    return fitted


def _layer_name(entry: Any) -> str:
    if isinstance(entry, str):
        name = entry
    elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        name = entry["name"]
    elif isinstance(getattr(entry, "name", None), str):  # solar_edge.format.bundle.BundleLayer
        name = entry.name
    else:
        raise AdapterError(f"manifest layer entry without a name: {entry!r}")
    return normalise_name(name.removesuffix(".weight"))


def _lookup(name: str, ids: Mapping[str, int]) -> int | None:
    """The bundle layer id of an adapter module: its normalised name, else the name without
    its first component (the task model's attribute for its transformer, e.g. ``roberta.``)."""
    normal = normalise_name(name)
    if normal in ids:
        return ids[normal]
    _, _, rest = name.removeprefix(PEFT_PREFIX).partition(".")
    return ids.get(rest) if rest else None


# Name components of modules that are task heads, not the adaptable body: the export leaves
# them out by default (exporters/targets.py), so no bundle has a layer for them.
HEAD_PARTS = frozenset({"pooler", "lm_head", "classifier", "score"})


def _unmatched_hint(unmatched: Sequence[str]) -> str:
    heads = [n for n in unmatched if HEAD_PARTS & set(n.split("."))]
    if heads:  # PEFT's target_modules="all-linear" adapts BERT's pooler.dense
        return (f"; {', '.join(heads)} belongs to the task head, which bundles do not adapt "
                f"(target_modules='all-linear' includes it): train with exclude_modules="
                f"{sorted(heads)!r} or a target_modules list without it")
    return "; the bundle adapts only the layers it was exported with (export --target-modules)"


def match_to_bundle(updates: Mapping[str, LayerUpdate],
                    manifest_layers: Sequence[Any]) -> dict[int, LayerUpdate]:
    """Map updates to bundle layer ids (positions in ``manifest["layers"]``).

    Entries are module names, manifest dicts or ``BundleLayer`` objects with ``name`` (and
    optionally ``shape`` = ``[out, in]``, checked against the update). VeRA factors wider
    than the layer are sliced to its input size. Every update must find its layer.
    """
    ids = {_layer_name(entry): i for i, entry in enumerate(manifest_layers)}
    found = {name: _lookup(name, ids) for name in updates}
    unmatched = sorted(name for name, lid in found.items() if lid is None)
    if unmatched:
        raise AdapterError(f"{len(unmatched)} adapter modules have no bundle layer: "
                           f"{unmatched}{_unmatched_hint(unmatched)}")
    result: dict[int, LayerUpdate] = {}
    for name, update in updates.items():
        layer_id = found[name]
        assert layer_id is not None
        entry = manifest_layers[layer_id]
        shape = entry.get("shape") if isinstance(entry, Mapping) else getattr(entry, "shape", None)
        if shape is not None:
            update = fit_shapes({name: update}, {name: shape})[name]
        result[layer_id] = update
    return result


@dataclass(frozen=True)
class MatchedExtras:
    """An adapter's :class:`~solar_edge.methods.base.Extras` against a bundle: biases and
    magnitudes by layer id (checked to be one value per output), head tensors by name."""

    head: dict[str, np.ndarray]
    biases: dict[int, np.ndarray]
    magnitudes: dict[int, np.ndarray]
    bias_deltas: dict[int, np.ndarray] = field(default_factory=dict)

    def with_bias_deltas(self, base_bias: Callable[[int], np.ndarray | None],
                         name_of: Callable[[int], str] = str) -> MatchedExtras:
        """``bias_deltas`` folded into ``biases`` (whole values: the trained bias, else
        ``base_bias(lid)``, plus the delta); layers without a base bias are refused."""
        if not self.bias_deltas:
            return self
        biases = dict(self.biases)
        for lid, delta in sorted(self.bias_deltas.items()):
            start = biases.get(lid, base_bias(lid))
            if start is None:
                raise AdapterError(f"{name_of(lid)}: lora_bias=True on a layer without a "
                                   "bias (PEFT cannot merge it either)")
            biases[lid] = (np.asarray(start, np.float32) + delta).astype(np.float32)
        return MatchedExtras(self.head, biases, self.magnitudes)


def match_extras(extras: Extras, manifest_layers: Sequence[Any]) -> MatchedExtras:
    ids = {_layer_name(entry): i for i, entry in enumerate(manifest_layers)}

    def by_layer(values: Mapping[str, np.ndarray], what: str) -> dict[int, np.ndarray]:
        found = {name: _lookup(name, ids) for name in values}
        unknown = sorted(name for name, lid in found.items() if lid is None)
        if unknown:
            raise AdapterError(f"trained {what} of modules the bundle cannot patch: {unknown[:6]}"
                               " (only adaptable layers are carried; LayerNorm and embedding "
                               "biases are not, so train with bias='lora_only')")
        out = {}
        for name, value in values.items():
            lid = found[name]
            assert lid is not None
            entry = manifest_layers[lid]
            shape = entry.get("shape") if isinstance(entry, Mapping) else getattr(entry, "shape",
                                                                                  None)
            if shape is not None and value.shape != (int(shape[0]),):
                raise AdapterError(f"{name}: {what} of shape {value.shape} for a layer of "
                                   f"{int(shape[0])} outputs")
            out[lid] = value
        return out

    return MatchedExtras(dict(extras.head), by_layer(extras.biases, "biases"),
                         by_layer(extras.magnitudes, "DoRA magnitudes"),
                         by_layer(extras.bias_deltas, "lora_B biases"))
