"""ONNX graph variants the runtime's patching mechanisms need (export side: uses ``onnx``).

The runtime never rewrites graphs (it stays numpy + onnxruntime), so every graph shape a
patching mechanism needs is produced here, once, by the export stage:

* the plain graph (``model.onnx``, written by :mod:`.onnx_export`) gives each adaptable
  weight a stable initializer name ``<module>.weight_t`` holding ``W0.T`` (``in x out``)
  that feeds exactly one ``MatMul`` as its right operand; mechanisms ``initializer`` and
  ``recreate`` patch it.
* :func:`weights_as_inputs` also lists those initializers (and the layers' bias
  initializers ``<module>.bias``) as graph inputs, which makes them overridable (ONNX IR
  >= 4): the ``iobinding`` mechanism feeds patched weights as inputs and the initializer
  stays the base default.
* :func:`add_lora_slots` adds, per adaptable weight, inputs ``<init>.lora_A`` (``in x r``),
  ``<init>.lora_B`` (``r x out``), ``<init>.lora_scale`` and ``<init>.lora_bias``
  (``out``) with neutral defaults, and ``(y + (x @ A) @ B) * scale + bias`` after the
  weight's ``MatMul``: the ``lora`` mechanism serves the decoded update unmerged
  (``A = Rt``, ``B = L.T``; DoRA's row scale and trained bias deltas in the other two),
  either through ORT's native adapters (``RunOptions.add_active_adapter``) or as feeds.
  ``lora-plain`` (decoder and ViT bundles, written with ``lora``) has only ``y + (x @ A) @ B``: two
  nodes fewer per weight, which the ``lora`` mechanism serves packets without a DoRA scale or
  bias delta on (docs/decoder.md measures it).

The names are :mod:`solar_edge.format.graph`'s, which the runtime patches by.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from solar_edge.errors import ExportError
from solar_edge.format.graph import lora_extra_slot_names, lora_slot_names

from .onnx_export import consumers


def _initializers(graph: onnx.GraphProto, names: Iterable[str]) -> list[onnx.TensorProto]:
    by_name = {i.name: i for i in graph.initializer}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ExportError(f"no such initializers: {missing[:5]}")
    return [by_name[n] for n in names]


def weights_as_inputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose named initializers are also graph inputs (overridable)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.ir_version < 4:
        raise ExportError("overridable initializers need ONNX IR version >= 4")
    present = {i.name for i in out.graph.input}
    for init in _initializers(out.graph, list(names)):
        if init.name not in present:
            out.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    return out


def add_lora_slots(model: onnx.ModelProto, names: Iterable[str],
                   extras: bool = True) -> onnx.ModelProto:
    """Copy of ``model`` with ``y = (y + (x @ A) @ B) * scale + bias_delta`` slots after each
    named weight's MatMul (before the layer's own bias).

    Each slot is a graph input with a neutral default initializer (empty ``A``/``B``,
    ``scale = 1``, ``bias_delta = 0``), so the graph computes the base model when nothing is
    fed. The rank dimension is symbolic per weight. ``scale`` serves DoRA's row scaling,
    ``bias_delta`` trained biases. ``extras=False`` leaves both out: ``y + (x @ A) @ B``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for init in _initializers(graph, list(names)):
        uses = consumers(graph, init.name)
        if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 1:
            raise ExportError(f"{init.name}: must feed exactly one MatMul as right operand")
        node = uses[0][0]
        d_in, d_out = int(init.dims[0]), int(init.dims[1])
        a_name, b_name = lora_slot_names(init.name)
        rank = f"{init.name}.rank"
        graph.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [d_in, rank]))
        graph.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, d_out]))
        graph.initializer.append(numpy_helper.from_array(np.zeros((d_in, 0), np.float32), a_name))
        graph.initializer.append(numpy_helper.from_array(np.zeros((0, d_out), np.float32), b_name))
        scale_name, bias_name = lora_extra_slot_names(init.name)
        extra_slots = ((scale_name, np.ones(d_out, np.float32)),
                       (bias_name, np.zeros(d_out, np.float32))) if extras else ()
        for name, default in extra_slots:
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [d_out]))
            graph.initializer.append(numpy_helper.from_array(default, name))
        y = node.output[0]
        base_y = y + ".base"
        node.output[0] = base_y
        xa, delta = init.name + ".lora_xa", init.name + ".lora_delta"
        summed, scaled = init.name + ".lora_sum", init.name + ".lora_scaled"
        idx = list(graph.node).index(node)
        new_nodes[idx] = [
            helper.make_node("MatMul", [node.input[0], a_name], [xa], name=xa),
            helper.make_node("MatMul", [xa, b_name], [delta], name=delta),
            helper.make_node("Add", [base_y, delta], [summed if extras else y],
                             name=init.name + ".lora_add"),
        ]
        if extras:
            new_nodes[idx] += [
                helper.make_node("Mul", [summed, scale_name], [scaled], name=scaled),
                helper.make_node("Add", [scaled, bias_name], [y],
                                 name=init.name + ".lora_bias_add")]
    ordered: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(new_nodes.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return out


# --- bundles ---------------------------------------------------------------------------------

VARIANT_FILES = {"inputs": "model.inputs.onnx", "lora": "model.lora.onnx",
                 "lora-plain": "model.lora-plain.onnx"}
# Families whose bundles get ``lora-plain`` beside ``lora``, where it measured faster
# (docs/decoder.md, docs/vision.md: small weights, where per-node cost dominates); MiniLM's
# text encoder measured no gain and keeps one LoRA graph.
PLAIN_SLOT_FAMILIES = ("causal-lm", "vit")


def add_variants_to_bundle(bundle_dir: str, variants: Iterable[str] = ("inputs", "lora")) -> None:
    """Write graph variants beside a bundle's ``model.onnx`` and re-seal the manifest.

    Adds each file to ``manifest["files"]`` with its size and SHA-256, records it under
    ``manifest["onnx"]["variants"]`` and recomputes the fingerprint (packets name the
    fingerprint, so variants must be added before packets are made for the bundle). Weights
    stored as external data stay there, so a variant costs kilobytes, not a graph copy.
    """
    import json
    from pathlib import Path

    from solar_edge.format.bundle import MANIFEST, compute_fingerprint, sha256_file

    root = Path(bundle_dir)
    manifest = json.loads((root / MANIFEST).read_text())
    # External data (the weights/NNNN.npy files) stays external: variants are small files
    # that point at the same weight bytes as the base graph.
    model = onnx.load(str(root / manifest["onnx"]["file"]), load_external_data=False)
    weights = [layer["onnx"]["initializer"] for layer in manifest["layers"]]
    biases = [layer["onnx"]["bias"] for layer in manifest["layers"] if layer["onnx"].get("bias")]
    makers = {"inputs": lambda m: weights_as_inputs(m, weights + biases),
              "lora": lambda m: add_lora_slots(m, weights),
              "lora-plain": lambda m: add_lora_slots(m, weights, extras=False)}
    table = dict(manifest["onnx"].get("variants") or {})
    variants = list(variants)
    if "lora" in variants and "lora-plain" not in variants and \
            (manifest.get("model") or {}).get("family") in PLAIN_SLOT_FAMILIES:
        variants.append("lora-plain")
    for variant in variants:
        if variant not in makers:
            raise ExportError(f"unknown variant {variant!r}; known: {sorted(makers)}")
        rel = VARIANT_FILES[variant]
        onnx.save(makers[variant](model), str(root / rel))
        manifest["files"][rel] = {"bytes": (root / rel).stat().st_size,
                                  "sha256": sha256_file(root / rel)}
        table[variant] = rel
    manifest["onnx"]["variants"] = table
    manifest["fingerprint"] = compute_fingerprint(manifest).hex()
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
