"""``solar-edge unpack``: a packet -> the PEFT adapter that computes what the board serves.

The packet is decoded exactly as the board decodes it (:func:`solar_edge.decode.decode_records`)
and written as a LoRA (or DoRA) adapter of those factors, whatever record kinds carried them:

* factors ``(L, Rt)`` -> ``lora_B = L``, ``lora_A = Rt.T`` with ``lora_alpha = r`` (scaling 1);
  layers of another rank than the most common one go into ``rank_pattern``/``alpha_pattern``
  under their full, regex-escaped module name (PEFT matches ``(.*\\.)?(key)$``);
* DoRA magnitude deltas -> ``lora_magnitude_vector = |W0|_row + d`` (``use_dora``); a LoRA
  layer without one gets ``|W0 + dW|_row`` (row scale 1, as the board serves it);
* bias deltas -> ``bias: "lora_only"`` and ``<module>.base_layer.bias = b0 + delta``;
* a bias or magnitude on a layer without factors gets rank-1 zero factors (exact);
* head tensors -> ``modules_to_save`` (task type ``SEQ_CLS``; keys of the base transformer
  under its attribute, e.g. ``bert.``); no head: ``FEATURE_EXTRACTION``, keys without prefix.

Labels go to ``config.json`` (``id2label``); the project's seeded head (``head_seed``) has no
tensors, so labels and seed go to ``task.json`` beside the adapter.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from solar_edge.cli import options
from solar_edge.decode import Decoded, LayerDims, decode_records
from solar_edge.errors import AdapterError, BaseMismatchError, CodecError
from solar_edge.format import signing
from solar_edge.format.bundle import Bundle, load_bundle
from solar_edge.format.packet import Packet
from solar_edge.format.reader import decode_packet

from .adapter_checks import row_norms

PEFT_PREFIX = "base_model.model."
TASK_KEYS = ("task", "labels", "head_seed")


@dataclass
class Unpacked:
    """What :func:`unpack_packet` wrote."""

    out: Path
    task_type: str | None                    # PEFT's; None for an image classifier
    ranks: dict[str, int]                    # module -> LoRA rank
    dora: bool
    biases: list[str]
    head: list[str]                          # head tensor names
    labels: list[str] | None
    verified: bool
    notes: list[str] = field(default_factory=list)


def read_packet(data: bytes, bundle: Bundle, trusted_keys: Sequence[Any] | None) -> Packet:
    """Decode (verifying when keys are given) and check the packet is for ``bundle``."""
    packet = decode_packet(data, trusted_keys if trusted_keys else None)
    if packet.header.fingerprint != bundle.fingerprint:
        raise BaseMismatchError(
            f"packet is for bundle {packet.header.fingerprint.hex()[:16]}..., not this bundle "
            f"{bundle.fingerprint.hex()[:16]}...", field="header.fingerprint")
    return packet


def decode_for(packet: Packet, bundle: Bundle) -> Decoded:
    """The packet's records decoded against the bundle, as the board decodes them."""
    def dims_of(lid: int) -> LayerDims | None:
        if not 0 <= lid < len(bundle.layers):
            return None
        layer = bundle.layers[lid]
        return LayerDims(layer.out_features, layer.in_features, layer.rank)

    return decode_records(packet.records, packet.codec, dims_of, bundle.layer_basis)


def classifier_layout(model_type: str | None) -> tuple[str, str | None]:
    """Where a classifier of ``model_type`` keeps its transformer (``"bert."``), and the PEFT
    ``task_type`` its adapter has: ``SEQ_CLS`` for text; none for an image classifier (PEFT
    has no image task type, and its ``SEQ_CLS`` model feeds ``input_ids``)."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as IMAGE,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as TEXT,
    )

    for names, task_type in ((TEXT, "SEQ_CLS"), (IMAGE, None)):
        name = names.get(model_type or "", "")
        cls = getattr(transformers, name if isinstance(name, str) else "", None)
        prefix = getattr(cls, "base_model_prefix", None)
        if prefix:
            return f"{prefix}.", task_type
    raise AdapterError(f"cannot tell where a {model_type!r} classifier keeps its "
                       "transformer, so the adapter's keys cannot be named")


def layer_tensors(bundle: Bundle, decoded: Decoded, prefix: str
                  ) -> tuple[dict[str, np.ndarray], dict[str, int], list[str]]:
    """LoRA/DoRA/bias tensors by PEFT key, each module's rank, modules with a bias."""
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    with_bias: list[str] = []
    dora = bool(decoded.magnitudes)
    wanted = set(decoded.biases) | set(decoded.magnitudes) | {
        lid for lid, (left, _) in decoded.factors.items() if left.shape[1]}
    for lid in sorted(wanted):
        layer = bundle.layer(lid)
        out_f, in_f = layer.shape
        left, right_t = decoded.factors.get(lid, (np.zeros((out_f, 0)), np.zeros((in_f, 0))))
        if left.shape[1] == 0:  # rank 0: a zero rank-1 LoRA changes nothing, exactly
            left, right_t = np.zeros((out_f, 1)), np.zeros((in_f, 1))
        left, right_t = np.asarray(left, np.float32), np.asarray(right_t, np.float32)
        if not (np.isfinite(left).all() and np.isfinite(right_t).all()):
            raise CodecError(f"layer {lid} ({layer.name}): non-finite factors")
        key = PEFT_PREFIX + prefix + layer.name
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(right_t.T)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(left)
        ranks[layer.name] = int(left.shape[1])
        w0 = np.asarray(bundle.base_weight(lid), np.float32)
        if lid in decoded.magnitudes:
            m = row_norms(w0) + decoded.magnitudes[lid].astype(np.float64)
            tensors[f"{key}.lora_magnitude_vector"] = m.astype(np.float32)
        elif dora:
            dw = left.astype(np.float64) @ right_t.T.astype(np.float64)
            tensors[f"{key}.lora_magnitude_vector"] = row_norms(w0 + dw).astype(np.float32)
        b0 = bundle.base_bias(lid)
        if lid in decoded.biases and b0 is None:
            raise CodecError(f"layer {lid} ({layer.name}): the packet changes a bias this "
                             "bundle has no patchable copy of (the board refuses it too)")
        if b0 is not None:
            delta = decoded.biases.get(lid, np.zeros(out_f, np.float32))
            tensors[f"{key}.base_layer.bias"] = (np.asarray(b0, np.float32) + delta).astype(
                np.float32)
            if lid in decoded.biases:
                with_bias.append(layer.name)
    if not ranks:
        raise CodecError("the packet changes no layer: there is no adapter to write")
    if not decoded.biases:  # no trained bias: leave the base biases to the base model
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".base_layer.bias")}
    return tensors, ranks, with_bias


def head_tensors(bundle: Bundle, decoded: Decoded, meta: dict[str, Any], prefix: str
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Head tensors by PEFT key and the ``modules_to_save`` they belong to."""
    spec = meta.get("head") or {}
    declared = spec.get("tensors") or []
    tensors: dict[str, np.ndarray] = {}
    for index, arr in sorted(decoded.head.items()):
        name, shape = str(declared[index]["name"]), declared[index]["shape"]
        tensors[name] = np.asarray(arr, np.float32).reshape(shape)
    weight = spec.get("weight")
    if weight in tensors and spec.get("bias") is None:  # the board adds no bias: neither may PEFT
        tensors[weight.removesuffix(".weight") + ".bias"] = np.zeros(
            tensors[weight].shape[0], np.float32)
    keyed, modules = {}, set()
    for name, arr in tensors.items():
        in_base = bundle.head_part(name) is not None  # a base-model part, e.g. pooler.dense
        module = name.rsplit(".", 1)[0] if in_base else name.split(".", 1)[0]
        modules.add(module)
        keyed[PEFT_PREFIX + (prefix if in_base else "") + name] = arr
    return keyed, sorted(modules)


def _config(bundle: Bundle, ranks: dict[str, int], *, task_type: str | None, dora: bool,
            bias: bool,
            modules_to_save: list[str]) -> Any:
    from peft import LoraConfig

    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): k for name, k in sorted(ranks.items()) if k != r}
    return LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
        target_modules=sorted(ranks), lora_dropout=0.0, use_dora=dora,
        bias="lora_only" if bias else "none", modules_to_save=modules_to_save or None,
        task_type=task_type, inference_mode=True,
        fan_in_fan_out=bool(bundle.manifest.get("model", {}).get("fan_in_fan_out")),
        base_model_name_or_path=bundle.manifest.get("model", {}).get("name"))


def unpack_packet(data: bytes, bundle: Bundle, out: Path,
                  trusted_keys: Sequence[Any] | None = None) -> Unpacked:
    """Write the PEFT adapter of ``data`` (a packet for ``bundle``) into ``out``."""
    from safetensors.numpy import save_file

    packet = read_packet(data, bundle, trusted_keys)
    decoded = decode_for(packet, bundle)
    meta = dict(packet.header.metadata)
    labels = [str(x) for x in meta.get("labels") or []] or None
    has_head = "head" in meta
    causal = bundle.manifest.get("model", {}).get("family") == "causal-lm"
    task_type: str | None = "CAUSAL_LM" if causal else "FEATURE_EXTRACTION"
    prefix = ""
    if has_head:
        prefix, task_type = classifier_layout(bundle.manifest.get("model", {}).get("model_type"))
    tensors, ranks, with_bias = layer_tensors(bundle, decoded, prefix)
    head, modules = head_tensors(bundle, decoded, meta, prefix) if has_head else ({}, [])
    config = _config(bundle, ranks, task_type=task_type, dora=bool(decoded.magnitudes),
                     bias=bool(decoded.biases), modules_to_save=modules)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({**tensors, **head}, str(out / "adapter_model.safetensors"))
    notes = []
    if labels:
        (out / "config.json").write_text(json.dumps({
            "id2label": {str(i): n for i, n in enumerate(labels)},
            "label2id": {n: i for i, n in enumerate(labels)}, "num_labels": len(labels)},
            indent=1) + "\n")
    if not has_head and "head_seed" in meta:
        task = {k: meta[k] for k in TASK_KEYS if k in meta}
        (out / "task.json").write_text(json.dumps(task, indent=1) + "\n")
        notes.append("seeded task head: labels and head_seed written to task.json")
    return Unpacked(out, task_type, ranks, bool(decoded.magnitudes), with_bias,
                    sorted(k.removeprefix(PEFT_PREFIX) for k in head), labels,
                    bool(trusted_keys), notes)


@click.command("unpack")
@click.argument("packet_path", metavar="PACKET",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Exported bundle the packet is for.")
@options.out_dir("the PEFT adapter (adapter_config.json, adapter_model.safetensors); "
                 "must be new or empty.")
@options.trusted_keys(help_tail="Given, the signature is verified.")
@options.as_json()
def unpack(packet_path: Path, bundle_dir: Path, out: Path, trusted_keys: tuple[Path, ...],
           as_json: bool) -> None:
    """Write PACKET as a PEFT LoRA/DoRA adapter that computes what the board serves.

    Load it with peft.PeftModel.from_pretrained(base_model, OUT). Without --trusted-key the
    signature is not checked.
    """
    if out.exists() and any(out.iterdir()):
        raise click.UsageError(f"--out {out} is not empty")
    keys = [signing.load_public_key(k) for k in trusted_keys]
    result = unpack_packet(packet_path.read_bytes(), load_bundle(bundle_dir), out, keys)
    signature = "verified" if result.verified else "not checked (no --trusted-key)"
    if as_json:
        options.emit_json({**asdict(result), "signature": signature})
        return
    ranks = sorted(set(result.ranks.values()))
    click.echo(f"signature: {signature}")
    kind = result.task_type or "image classifier"
    click.echo(f"wrote {out}: {kind} {'DoRA' if result.dora else 'LoRA'} on "
               f"{len(result.ranks)} modules, rank {'/'.join(map(str, ranks))}"
               + (f", {len(result.biases)} trained biases" if result.biases else "")
               + (f", head {', '.join(result.head)}" if result.head else ""))
    if result.labels:
        click.echo(f"labels: {', '.join(result.labels)}")
    for note in result.notes:
        click.echo(f"note: {note}")
