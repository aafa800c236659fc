"""What kind of task head an adapter's ``modules_to_save`` tensors are (no torch).

PEFT saves a classifier's head as plain tensors; which computation they take part in
depends on the architecture. The layouts known here, by tensor names:

* BERT-style (``classifier.weight`` [+ ``.bias``], the base model's ``pooler.dense``):
  ``classifier(tanh(pooler(h[CLS])))``;
* RoBERTa-style (``classifier.dense.*`` and ``classifier.out_proj.*``):
  ``out_proj(act(dense(h[CLS])))``, ``act`` by model type (:func:`dense_head_activation`:
  tanh for RoBERTa and its relatives, GELU for ELECTRA, the model's ``hidden_act`` for the
  few whose head uses it);
* DistilBERT-style (``pre_classifier.*`` and ``classifier.*``, both saved by PEFT since
  both names end in ``classifier``): ``classifier(relu(pre_classifier(h[CLS])))``;
* a plain linear head without a pooler (``classifier.weight`` and no pooler anywhere):
  ``classifier(h[CLS])``.

The result is the metadata ``head`` object the board reads (:mod:`solar_edge.runtime.heads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError

# The activation between ``classifier.dense`` and ``classifier.out_proj``, by model type
# (transformers' ``*ClassificationHead`` of each).
TANH_DENSE_HEADS = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
    "data2vec-text", "longformer", "mpnet", "ibert", "xmod", "lilt", "layoutlmv3", "esm"})
FIXED_DENSE_HEADS = {"electra": "gelu"}
HIDDEN_ACT_DENSE_HEADS = frozenset({"big_bird", "convbert", "mra", "nystromformer",
                                    "roformer", "yoso"})
BOARD_ACTIVATIONS = ("tanh", "gelu", "relu")  # solar_edge.runtime.heads.ACTIVATIONS


def dense_head_activation(model_type: str | None, hidden_act: Any = None) -> str:
    """What a ``classifier.dense`` / ``classifier.out_proj`` head applies between its two
    layers; AdapterError where that is not known or not one the board computes (a wrong
    guess would serve wrong logits without a word)."""
    if model_type is None or model_type in TANH_DENSE_HEADS:
        return "tanh"  # no model type recorded: the RoBERTa layout, as bundles always had
    if model_type in FIXED_DENSE_HEADS:
        return FIXED_DENSE_HEADS[model_type]
    if model_type in HIDDEN_ACT_DENSE_HEADS:
        if hidden_act in BOARD_ACTIVATIONS:
            return str(hidden_act)
        raise AdapterError(f"a {model_type} classifier applies the model's hidden_act "
                           f"({hidden_act!r}) in its head: the board computes "
                           f"{', '.join(BOARD_ACTIVATIONS)} (save the model's config.json "
                           "beside the adapter if it is one of them)")
    raise AdapterError(f"a classifier.dense / classifier.out_proj head on a {model_type!r} "
                       "model: the board does not know which activation that head applies")


def base_model_type(adapter: Any, bundle: Any) -> tuple[str | None, Any]:
    """``(model_type, hidden_act)`` of the model the head sits on: the bundle's model type
    (what the board serves), else the adapter's ``config.json``; ``hidden_act`` from that."""
    config = getattr(adapter, "model_config", None) or {}
    model_type = bundle.manifest.get("model", {}).get("model_type") or config.get("model_type")
    return model_type, config.get("hidden_act")


def head_spec(tensors: Mapping[str, np.ndarray], has_base_part: Any,
              model_type: str | None = None, hidden_act: Any = None) -> dict[str, Any]:
    """``tensors``: the adapter's head tensors by name; ``has_base_part(name)``: whether the
    bundle carries that base tensor (``head_parts``); ``model_type`` / ``hidden_act``: the
    base model's, which decide a RoBERTa-style head's activation. Raises AdapterError for a
    layout the board cannot compute."""
    names = set(tensors)
    spec: dict[str, Any] = {"type": "sequence-classification", "pooling": "cls",
                            "activation": "tanh"}
    if {"classifier.dense.weight", "classifier.out_proj.weight"} <= names:
        spec.update(activation=dense_head_activation(model_type, hidden_act))
        spec.update(weight="classifier.out_proj.weight", pooler="classifier.dense",
                    bias="classifier.out_proj.bias" if "classifier.out_proj.bias" in names
                    else None)
    elif "classifier.weight" in names:
        spec.update(weight="classifier.weight",
                    bias="classifier.bias" if "classifier.bias" in names else None)
        if "pre_classifier.weight" in names:  # DistilBERT: classifier(relu(pre_classifier))
            spec.update(pooler="pre_classifier", activation="relu")
        elif "pooler.dense.weight" in names or has_base_part("pooler.dense.weight"):
            spec["pooler"] = "pooler.dense"
    else:
        raise AdapterError(f"a head of tensors {sorted(names)[:6]} is not a layout the board "
                           "knows (BERT- or RoBERTa-style sequence classification)")
    return spec


def num_labels(spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> int:
    return int(np.asarray(tensors[spec["weight"]]).shape[0])
