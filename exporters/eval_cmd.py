"""``solar-edge eval``: how a packet, as the board serves it, agrees with its adapter in torch.

The board side is the real runtime (:class:`~solar_edge.runtime.engine.EdgeRuntime`) on the
packet as given, verified against ``--trusted-key``; without a key the packet is read
unverified and re-signed with a throwaway key for the run (same records, so the same
outputs). The torch side is the
uncompressed PEFT adapter on the bundle's base model (checked weight by weight):

* a trained head (``modules_to_save``; ``task_type`` ``SEQ_CLS`` or none):
  ``AutoModelForSequenceClassification`` + PEFT, its logits;
* the project's seeded head (``task.json`` with ``labels`` and ``head_seed``): ``AutoModel`` +
  PEFT + that head (:func:`solar_edge.exporters.heads.head_for`);
* otherwise: the unit mean-pooled embeddings.

Both see the same texts (whitespace collapsed), tokenised to the runtime's 128 tokens.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from solar_edge.cli import options
from solar_edge.errors import AdapterError, CalibrationError
from solar_edge.format import signing
from solar_edge.format.bundle import Bundle, load_bundle
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import Adapter
from solar_edge.methods.peft_files import read_adapter

from .calib_data import read_calibration_file
from .unpack import decode_for, read_packet

MAX_LEN = 128  # the runtime's truncation (runtime/families/text_encoder.py)
BATCH = 32


def board_outputs(bundle_dir: Path, data: bytes, keys: list, texts: list[str]) -> np.ndarray:
    """The packet applied to a real board runtime on ``bundle_dir``: logits (with a head) or
    unit embeddings, one row per text."""
    from solar_edge.runtime.engine import EdgeRuntime

    runtime = EdgeRuntime(str(bundle_dir), keys)
    runtime.apply(data)
    return np.concatenate([runtime.infer(texts[i:i + BATCH])
                           for i in range(0, len(texts), BATCH)]).astype(np.float32)


def base_model_dir(bundle: Bundle, model_dir: Path | None) -> Path:
    from .families.text_encoder import DEFAULT_MODEL_NAME, NAME, default_model_dir

    model = bundle.manifest.get("model", {})
    if model.get("family", NAME) != NAME:
        if model.get("family") == "causal-lm":
            raise CalibrationError("eval compares classifier or embedding outputs; a decoder's "
                                   "packets are measured by compress --max-drop (next-token "
                                   "agreement) and bench/decoder_rd.py (perplexity)")
        raise CalibrationError(f"eval runs texts; a {model.get('family')!r} bundle takes arrays")
    if model_dir is not None:
        return model_dir
    if model.get("name") == DEFAULT_MODEL_NAME:
        return default_model_dir()
    raise CalibrationError(f"eval runs the bundle's base model ({model.get('name')!r}): give "
                           "its directory (--model DIR)")


def torch_outputs(adapter_dir: Path, adapter: Adapter, bundle: Bundle, base: Path,
                  texts: list[str]) -> tuple[np.ndarray, str]:
    """The uncompressed adapter's logits or unit embeddings, and which of the two."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from .adapter_checks import check_problem_type
    from .families.base import check_matches_bundle, mean_pooled, unit
    from .families.text_encoder import quiet_loading
    from .head_specs import base_model_type, head_spec, num_labels
    from .heads import head_for

    seq_cls = bool(adapter.extras.head)  # a classifier, with or without task_type SEQ_CLS
    if adapter.config.get("task_type") == "SEQ_CLS" and not seq_cls:
        raise AdapterError(f"{adapter_dir}: a SEQ_CLS adapter without head tensors")
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        if seq_cls:
            spec = head_spec(adapter.extras.head, lambda n: bundle.head_part(n) is not None,
                             *base_model_type(adapter, bundle))
            check_problem_type(adapter, num_labels(spec, adapter.extras.head))
            model = AutoModelForSequenceClassification.from_pretrained(
                str(base), num_labels=num_labels(spec, adapter.extras.head))
            inner = getattr(model, model.base_model_prefix)
        else:
            model = inner = AutoModel.from_pretrained(str(base))
        check_matches_bundle(inner, bundle, range(len(bundle.layers)))
        with warnings.catch_warnings():  # transformers deprecations PEFT triggers
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    head = None if seq_cls else head_for(adapter.task_meta, int(model.config.hidden_size))
    rows = []
    with torch.no_grad():
        for s in range(0, len(texts), BATCH):
            enc = tokenizer(texts[s:s + BATCH], truncation=True, max_length=MAX_LEN,
                            padding=True, return_tensors="pt")
            out = peft_model(**enc)
            if seq_cls:
                rows.append(out.logits)
                continue
            hidden, mask = out.last_hidden_state, enc["attention_mask"]
            rows.append(head(hidden, mask) if head is not None
                        else unit(mean_pooled(hidden, mask)))
    kind = "embeddings" if not seq_cls and head is None else "logits"
    return torch.cat(rows).float().numpy(), kind


def mismatch_warnings(packet: Any, adapter: Adapter, bundle: Bundle) -> list[str]:
    """Signs that PACKET was not made from ADAPTER: it changes layers the adapter leaves
    alone (a smaller packet may drop layers, never add them), or names other labels."""
    from solar_edge.methods.matching import match_extras, match_to_bundle

    decoded = decode_for(packet, bundle)
    extras = match_extras(adapter.extras, bundle.layers)
    changed = {"factors": {lid for lid, (left, _) in decoded.factors.items() if left.shape[1]},
               "biases": set(decoded.biases), "magnitudes": set(decoded.magnitudes)}
    trained = {"factors": set(match_to_bundle(adapter.updates, bundle.layers)),
               "biases": set(extras.biases) | set(extras.bias_deltas),
               "magnitudes": set(extras.magnitudes)}
    warnings_ = []
    for what, ids in changed.items():
        stray = sorted(ids - trained[what])
        if stray:
            names = ", ".join(bundle.layers[i].name for i in stray[:2])
            more = f" and {len(stray) - 2} more" if len(stray) > 2 else ""
            warnings_.append(f"the packet changes {what} of {len(stray)} layer(s) the adapter "
                             f"does not ({names}{more}): was it made from another adapter?")
    packet_labels = packet.header.metadata.get("labels")
    if packet_labels and adapter.labels and list(packet_labels) != list(adapter.labels):
        warnings_.append(f"the packet's labels {list(packet_labels)[:4]} differ from the "
                         f"adapter's {list(adapter.labels)[:4]}")
    return warnings_


def compare(board: np.ndarray, ref: np.ndarray, kind: str, labels: list[int] | None
            ) -> dict[str, Any]:
    """Agreement, accuracies, cosines and the largest logit difference."""
    if board.shape != ref.shape:
        what = "logits" if board.shape[1] != ref.shape[1] else "outputs"
        raise AdapterError(f"the packet serves {board.shape[1]} values per text and the "
                           f"adapter {ref.shape[1]} ({kind} expected): they differ in {what}")
    cos = (board * ref).sum(1) / np.maximum(
        np.linalg.norm(board, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    result: dict[str, Any] = {"n": int(len(board)), "outputs": kind,
                              "mean_cosine": round(float(cos.mean()), 6),
                              "min_cosine": round(float(cos.min()), 6)}
    if kind == "logits":
        b, t = board.argmax(1), ref.argmax(1)
        result["agreement"] = round(100.0 * float((b == t).mean()), 2)
        result["max_abs_logit_diff"] = round(float(np.abs(board - ref).max()), 6)
        if labels is not None:
            y = np.asarray(labels)
            result["accuracy"] = {"board": round(100.0 * float((b == y).mean()), 2),
                                  "torch": round(100.0 * float((t == y).mean()), 2)}
    return result


@click.command("eval")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("packet_path", metavar="PACKET",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Exported bundle the packet is for.")
@click.option("--data", "data_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Texts: .txt (one per line) or .jsonl (\"text\", optional \"label\").")
@options.trusted_keys(help_tail="Given, the signature is verified.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path), default=None,
              help="The bundle's base model (transformers directory); default: the embedded "
                   "MiniLM when the bundle is its export.")
@options.as_json()
def eval_packet(adapter_dir: Path, packet_path: Path, bundle_dir: Path, data_path: Path,
                trusted_keys: tuple[Path, ...], model_dir: Path | None, as_json: bool) -> None:
    """Compare PACKET served by the board runtime with ADAPTER_DIR (uncompressed) in torch.

    Without --trusted-key the signature is not checked (the output says so).
    """
    bundle = load_bundle(bundle_dir)
    adapter = read_adapter(adapter_dir)
    data = packet_path.read_bytes()
    keys = [signing.load_public_key(k) for k in trusted_keys]
    packet = read_packet(data, bundle, keys)
    names = adapter.labels or packet.header.metadata.get("labels")  # data labels the adapter's
    calib = read_calibration_file(data_path, names)
    kept = [(" ".join(t.split()), i) for i, t in enumerate(calib.texts) if t.strip()]
    if not kept:
        raise CalibrationError(f"{data_path}: no texts")
    texts = [t for t, _ in kept]
    labels = None if calib.labels is None else [calib.labels[i] for _, i in kept]
    base = base_model_dir(bundle, model_dir)
    run_data, run_keys = data, keys
    if not keys:  # unverified: re-signed by a throwaway key so that the runtime takes it
        throwaway = signing.generate_private_key()
        run_data = encode_packet(packet.header, packet.codec, packet.records, throwaway)
        run_keys = [throwaway.public_key()]
    board = board_outputs(bundle_dir, run_data, run_keys, texts)
    ref, kind = torch_outputs(adapter_dir, adapter, bundle, base, texts)
    result = compare(board, ref, kind, labels)
    result["signature"] = "verified" if keys else "not checked (no --trusted-key)"
    result["warnings"] = mismatch_warnings(packet, adapter, bundle)
    if as_json:
        options.emit_json(result)
        return
    for line in result["warnings"]:
        click.echo(f"warning: {line}", err=True)
    click.echo(f"signature: {result['signature']}")
    click.echo(f"texts: {result['n']} ({'labelled' if labels is not None else 'unlabelled'}), "
               f"outputs: {kind}")
    if "agreement" in result:
        click.echo(f"prediction agreement: {result['agreement']:.2f}%")
    if "accuracy" in result:
        acc = result["accuracy"]
        click.echo(f"accuracy: board {acc['board']:.2f}%, torch {acc['torch']:.2f}%")
    click.echo(f"cosine board/torch: mean {result['mean_cosine']:.6f}, "
               f"min {result['min_cosine']:.6f}")
    if "max_abs_logit_diff" in result:
        click.echo(f"max abs logit difference: {result['max_abs_logit_diff']:.6f}")
