"""What the runtime takes from a verified bundle (``solar_edge.format.bundle``), in one place.

Adaptable weights become :class:`WeightSlot` entries (layer id, ONNX initializer, shape);
base weights stay the bundle's read-only memory maps; bases are read per layer only when a
packet needs them. Graph variants for the patching mechanisms are listed in the manifest
under ``onnx.variants`` (``docs/architecture.md``) and hashed like every other file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from solar_edge.decode import LayerDims
from solar_edge.errors import BundleError
from solar_edge.format.bundle import Bundle, LayerBasis, load_bundle
from solar_edge.profiles.device import load_profile
from solar_edge.runtime.patching import WeightSlot

SUPPORTED_LAYOUT = "in_out"


class _BaseWeights(Mapping[int, np.ndarray]):
    """Lazy ``{layer id: W0 memmap}``; nothing is read until a weight is used."""

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle
        self._cache: dict[int, np.ndarray] = {}

    def __getitem__(self, layer_id: int) -> np.ndarray:
        if layer_id not in self._cache:
            self._cache[layer_id] = self._bundle.base_weight(layer_id)
        return self._cache[layer_id]

    def __iter__(self):
        return iter(range(len(self._bundle.layers)))

    def __len__(self) -> int:
        return len(self._bundle.layers)


class _BaseBiases(Mapping[int, "np.ndarray | None"]):
    """Lazy ``{layer id: b0 memmap or None}`` for layers whose bias the graph can patch."""

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle

    def __getitem__(self, layer_id: int) -> np.ndarray | None:
        return self._bundle.base_bias(layer_id)

    def __iter__(self):
        return iter(range(len(self._bundle.layers)))

    def __len__(self) -> int:
        return len(self._bundle.layers)


@dataclass
class BundleParts:
    bundle: Bundle
    profile: dict[str, Any]
    slots: dict[int, WeightSlot]
    base: _BaseWeights
    base_biases: _BaseBiases = field(init=False)
    _row_norms: dict[int, np.ndarray] = field(default_factory=dict, init=False)
    _scales: dict[int, tuple[float, float]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.base_biases = _BaseBiases(self.bundle)

    def row_norms(self, layer_id: int) -> np.ndarray:
        """``|W0|`` per output row (float32), computed once per layer (DoRA)."""
        if layer_id not in self._row_norms:
            w0 = np.asarray(self.base[layer_id], np.float64)
            self._row_norms[layer_id] = np.sqrt((w0 * w0).sum(axis=1)).astype(np.float32)
        return self._row_norms[layer_id]

    def layer_scale(self, layer_id: int) -> tuple[float, float]:
        """``(W0's largest singular value, max |b0|)``, read once per layer (the growth bound
        of :func:`~solar_edge.runtime.patching.within_growth`); the singular value is 0 when
        the bundle stores none, ``max |b0|`` 0 for a layer without a patchable bias."""
        if layer_id not in self._scales:
            try:
                sigma1 = float(self.bundle.singular_values(layer_id)[0])
            except BundleError:  # no singular values stored: no bound, so the forward probe
                sigma1 = 0.0
            b0 = self.base_biases[layer_id]
            self._scales[layer_id] = (sigma1, float(np.abs(b0).max()) if b0 is not None else 0.0)
        return self._scales[layer_id]

    @property
    def fingerprint(self) -> bytes:
        return self.bundle.fingerprint

    @property
    def root(self) -> Path:
        return self.bundle.root

    def dims(self, layer_id: int) -> LayerDims | None:
        """Shape and basis rank of a layer (None: no such layer), read from the manifest."""
        slot = self.slots.get(layer_id)
        if slot is None:
            return None
        layer = self.bundle.layer(layer_id)
        return LayerDims(layer.out_features, layer.in_features, layer.rank)

    def basis(self, layer_id: int) -> LayerBasis:
        """The layer's stored basis, memory-mapped: decoding reads only the columns it uses.

        (Files were hashed by ``load_bundle``; a float16 basis is converted whole by
        ``LayerBasis``, float32 stays a map.)
        """
        layer = self.bundle.layer(layer_id)
        mats = []
        for key, rows in (("U", layer.out_features), ("V", layer.in_features)):
            arr = np.load(self.bundle.file_path(layer.files[key]), mmap_mode="r")
            if arr.shape != (rows, layer.rank):
                raise BundleError(f"shape {arr.shape}, manifest says {(rows, layer.rank)}",
                                  path=layer.files[key])
            mats.append(arr)
        return LayerBasis(layer_id, mats[0], mats[1])

    def graph_path(self, variant: str | None) -> Path:
        """The ONNX file of a graph variant (None: the base graph); must be hash-listed."""
        onnx_entry = self.bundle.manifest["onnx"]
        if variant is None:
            return self.bundle.onnx_path
        rel = (onnx_entry.get("variants") or {}).get(variant)
        if rel is None:
            raise BundleError(
                f"the bundle has no {variant!r} graph variant (manifest onnx.variants); "
                "export it again with solar-edge export --graph-variants inputs,lora, or pick "
                "another mechanism"
            )
        if rel not in self.bundle.manifest["files"]:
            raise BundleError("graph variant not listed with a hash", path=rel)
        return self.bundle.file_path(rel)

    def tokenizer_json(self) -> Path | None:
        tok = self.bundle.tokenizer_dir
        for cand in ([tok / "tokenizer.json"] if tok else []) + [self.root / "tokenizer.json"]:
            if cand.is_file():
                return cand
        return None


def open_bundle(bundle_dir: str | Path, profile: Any = None) -> BundleParts:
    """Load and verify the bundle; ``profile`` overrides the one recorded in its manifest."""
    bundle = load_bundle(bundle_dir)
    slots = {}
    for layer in bundle.layers:
        if layer.onnx_layout != SUPPORTED_LAYOUT:
            raise BundleError(
                f"layer {layer.name}: ONNX layout {layer.onnx_layout!r}, the runtime patches "
                f"{SUPPORTED_LAYOUT!r} (W0.T as the right operand of MatMul)", path="manifest.json"
            )
        slots[layer.id] = WeightSlot(layer.id, layer.onnx_initializer, layer.shape,
                                     layer.onnx_bias if "bias" in layer.files else None)
    return BundleParts(bundle, profile_dict(profile, bundle), slots, _BaseWeights(bundle))


def profile_dict(profile: Any, bundle: Bundle) -> dict[str, Any]:
    """A profile as a dict: None -> the bundle's; a name -> that shipped profile
    (``solar_edge/profiles/devices/<name>.toml``); a ``DeviceProfile`` or a mapping as given."""
    if profile is None:
        return bundle.profile
    if isinstance(profile, str):
        return load_profile(profile).to_dict()
    if hasattr(profile, "to_dict"):
        return dict(profile.to_dict())
    return dict(profile)
