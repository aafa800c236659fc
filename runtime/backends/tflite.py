"""LiteRT backend: patch weight bytes in a ``bytearray`` of the flatbuffer, re-create.

With LiteRT's default XNNPACK delegate, writes to constant tensors are ignored and a
read-only memory-mapped model segfaults on write (docs/runtime.md), so an adapter is staged as a
new copy of the flatbuffer with the patched weights written at the offsets the export
stage recorded, and a new interpreter built from it; the serving interpreter is swapped
only after the staged one passed the health check. The pristine file stays untouched.

The converter may fold a preceding LayerNorm into a FULLY_CONNECTED weight; the manifest
then carries ``input_scale`` / ``input_shift`` and the patch rule is
``W_tfl = W_tfl0 + dW * input_scale[None, :]``, ``b_tfl = b_tfl0 + dW @ input_shift``.
A scalar ``c`` the converter moves into query/key (attention's ``d**-0.25``) is part of
both and recorded as ``output_scale``: the stored bias is ``c`` times the layer's, so a
bias delta and the base bias enter as ``c * db`` and ``c * b0``.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from solar_edge.errors import BundleError, ProfileError, RuntimeApplyError
from solar_edge.runtime.bundle_parts import BundleParts
from solar_edge.runtime.patching import Patches

MECHANISMS = ("tflite",)


def interpreter_class() -> type:
    """``ai_edge_litert.interpreter.Interpreter``, else ``tflite_runtime``'s."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise ProfileError(
                "no LiteRT interpreter: pip install 'solar-edge[tflite]' (ai-edge-litert)"
            ) from exc
    return Interpreter


@dataclass(frozen=True)
class Placement:
    """Where one adaptable weight lives in the flatbuffer (float32, row-major ``out x in``)."""

    weight_offset: int
    shape: tuple[int, int]
    bias_offset: int | None = None
    input_scale: np.ndarray | None = None  # (in,)
    input_shift: np.ndarray | None = None  # (in,)
    output_scale: float = 1.0              # c: the stored layer is c * (the model's layer)

    def check(self, size: int) -> None:
        end = self.weight_offset + 4 * self.shape[0] * self.shape[1]
        if self.weight_offset < 0 or end > size or self.weight_offset % 4:
            raise BundleError(f"TFLite weight at {self.weight_offset} outside the model")
        if self.bias_offset is not None and (
            self.bias_offset < 0 or self.bias_offset + 4 * self.shape[0] > size
        ):
            raise BundleError(f"TFLite bias at {self.bias_offset} outside the model")


def patch_flatbuffer(pristine: Any, placements: Mapping[int, Placement], patches: Patches,
                     base_bias: Mapping[int, np.ndarray | None] | None = None) -> bytearray:
    """A new ``bytearray`` of the model with ``patches`` applied; ``pristine`` is only read.

    With folded ``g`` (input_scale) and ``beta`` (input_shift) the stored tensors are
    ``W_tfl0 = W0 * g`` and ``b_tfl0 = b0 + W0 beta``; the patched layer
    ``diag(s) (W0 + dW)``, ``b0 + db`` becomes ``W_tfl = diag(s) (W_tfl0 + dW * g)`` and
    ``b_tfl = b0 + db + s * (b_tfl0 - b0 + dW beta)``. ``b0`` is needed only with both ``s``
    and a folded ``beta``: unfolded, ``b_tfl0`` is ``b0`` and ``b_tfl = b_tfl0 + db``. With
    an ``output_scale`` ``c`` (``g`` and ``beta`` then include it) ``b0`` and ``db`` read
    ``c * b0`` and ``c * db`` throughout."""
    buf = bytearray(pristine)
    for lid, patch in patches.items():
        p = placements[lid]
        out_f, in_f = p.shape
        dw = (patch.factors[0] @ patch.factors[1].T if patch.factors is not None
              else np.zeros(p.shape, np.float32))
        w0 = np.frombuffer(pristine, "<f4", out_f * in_f, p.weight_offset).reshape(p.shape)
        scaled = dw * p.input_scale[None, :] if p.input_scale is not None else dw
        dst = np.frombuffer(buf, "<f4", out_f * in_f, p.weight_offset).reshape(p.shape)
        np.add(w0, scaled, out=dst)
        if patch.scale is not None:
            dst *= patch.scale[:, None]
        if p.input_shift is None and patch.bias is None:
            continue
        if p.bias_offset is None:
            raise RuntimeApplyError(f"layer {lid}: the patch changes a bias the TFLite graph "
                                    "does not have")
        b_tfl0 = np.frombuffer(pristine, "<f4", out_f, p.bias_offset)
        shifted = b_tfl0 + (dw @ p.input_shift if p.input_shift is not None else 0.0)
        if patch.scale is not None and p.input_shift is not None:
            b0 = None if base_bias is None else base_bias.get(lid)
            if b0 is None:
                raise RuntimeApplyError(f"layer {lid}: DoRA on a folded TFLite bias needs the "
                                        "bundle's base bias")
            shifted = p.output_scale * b0 + patch.scale * (shifted - p.output_scale * b0)
        if patch.bias is not None:
            shifted = shifted + p.output_scale * patch.bias
        np.copyto(np.frombuffer(buf, "<f4", out_f, p.bias_offset), shifted.astype(np.float32))
    return buf


TEXT_INPUTS = ("input_ids", "token_type_ids", "attention_mask")  # HF tokenizer order


def _graph_input(row: Mapping[str, Any], position: int) -> str:
    """The ONNX/torch input a TFLite input stands for (``graph_input``, else ``args_<i>``)."""
    if row.get("graph_input"):
        return str(row["graph_input"])
    match = re.search(r"args_(\d+)$", str(row["name"]))
    index = int(match.group(1)) if match else position
    return TEXT_INPUTS[index] if index < len(TEXT_INPUTS) else str(row["name"])


class TfliteBackend:
    """Same four steps as the ORT mechanisms (prepare, probe, commit, run)."""

    name = "tflite"

    def __init__(self, parts: BundleParts, *, threads: int = 0) -> None:
        bundle = parts.bundle
        section = bundle.manifest["tflite"]
        self.interpreter_cls = interpreter_class()
        self.threads = threads or None
        with open(bundle.tflite_path, "rb") as f:
            self.pristine = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.placements = {
            layer.id: self._placement(bundle, layer.tflite, layer.shape)
            for layer in bundle.layers
        }
        for p in self.placements.values():
            p.check(len(self.pristine))
        self.base_bias = getattr(parts, "base_biases", None)
        self.inputs = list(section.get("inputs", []))
        self.input_map = {row["name"]: _graph_input(row, i) for i, row in enumerate(self.inputs)}
        self.fixed_seq_len = int(section.get("seq_len", 0)) or int(
            parts.profile.get("tflite_seq_len", 128))
        self.interpreter = self._interpreter(bytes(self.pristine))

    @staticmethod
    def _placement(bundle: Any, rec: Mapping[str, Any] | None, shape: tuple[int, int]) -> Placement:
        if not rec:
            raise BundleError("a layer has no TFLite placement", path="manifest.json")
        w = rec["weight"]
        if tuple(w["shape"]) != tuple(shape) or w.get("layout", "out_in") != "out_in":
            raise BundleError(f"TFLite weight {w['shape']} does not match {shape}")

        def arr(key: str) -> np.ndarray | None:
            rel = rec.get(key)
            return None if not rel else np.load(bundle.file_path(rel)).astype(np.float32)

        bias = rec.get("bias")
        bias_offset = None if not bias else int(bias["offset"])
        c = rec.get("output_scale")
        c = 1.0 if c is None else c
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not np.isfinite(c) \
                or c == 0:
            raise BundleError(f"TFLite output_scale {c!r} is not a finite non-zero number",
                              path="manifest.json")
        return Placement(int(w["offset"]), (int(shape[0]), int(shape[1])), bias_offset,
                         arr("input_scale"), arr("input_shift"), float(c))

    def _interpreter(self, content: bytes) -> Any:
        interp = self.interpreter_cls(model_content=content, num_threads=self.threads)
        interp.allocate_tensors()
        return interp

    def input_names(self) -> list[str]:
        """The graph inputs (ONNX/torch names) the TFLite inputs stand for."""
        return list(self.input_map.values())

    def _run_with(self, interp: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        details = interp.get_input_details()
        by_graph = self.input_map
        batch = len(next(iter(feeds.values())))
        rows = []
        for b in range(batch):  # the converted graph is static, batch 1
            for d in details:
                x = np.asarray(feeds[by_graph.get(d["name"], d["name"])][b : b + 1])
                interp.set_tensor(d["index"], x.astype(d["dtype"]))
            interp.invoke()
            rows.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
        return [np.concatenate(rows, axis=0)]

    def check_link(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Nothing to check: every adapter gets a freshly built interpreter."""

    def prepare(self, patches: Patches) -> Any:
        return self._interpreter(bytes(patch_flatbuffer(self.pristine, self.placements, patches,
                                                        self.base_bias)))

    def staged_patches(self, staged: Any) -> None:
        return None  # weight offsets written into a copy of the flatbuffer

    def probe(self, staged: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._run_with(staged, feeds)

    def commit(self, staged: Any) -> None:
        self.interpreter = staged

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._run_with(self.interpreter, feeds)


def open_backend(parts: BundleParts, mechanism: str | None, threads: int = 0) -> TfliteBackend:
    if mechanism not in (None, *MECHANISMS):
        raise ProfileError(f"the tflite backend has no mechanism {mechanism!r}")
    return TfliteBackend(parts, threads=threads)
