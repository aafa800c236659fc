"""What kind of task head an adapter's ``modules_to_save`` tensors are (no torch).

PEFT saves a classifier's head as plain tensors; which computation they take part in
depends on the architecture. The layouts known here, by tensor names:

* BERT-style (``classifier.weight`` [+ ``.bias``], the base model's ``pooler.dense``):
  ``classifier(tanh(pooler(h[CLS])))``;
* RoBERTa-style (``classifier.dense.*`` and ``classifier.out_proj.*``):
  ``out_proj(tanh(dense(h[CLS])))``;
* a plain linear head without a pooler (``classifier.weight`` and no pooler anywhere):
  ``classifier(h[CLS])``.

The result is the metadata ``head`` object the board reads (:mod:`solar_edge.runtime.heads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from solar_edge.errors import AdapterError


def head_spec(tensors: Mapping[str, np.ndarray], has_base_part: Any) -> dict[str, Any]:
    """``tensors``: the adapter's head tensors by name; ``has_base_part(name)``: whether the
    bundle carries that base tensor (``head_parts``). Raises AdapterError for a layout the
    board cannot compute."""
    names = set(tensors)
    spec: dict[str, Any] = {"type": "sequence-classification", "pooling": "cls",
                            "activation": "tanh"}
    if {"classifier.dense.weight", "classifier.out_proj.weight"} <= names:
        spec.update(weight="classifier.out_proj.weight", pooler="classifier.dense",
                    bias="classifier.out_proj.bias" if "classifier.out_proj.bias" in names
                    else None)
    elif "classifier.weight" in names:
        spec.update(weight="classifier.weight",
                    bias="classifier.bias" if "classifier.bias" in names else None)
        if "pooler.dense.weight" in names or has_base_part("pooler.dense.weight"):
            spec["pooler"] = "pooler.dense"
    else:
        raise AdapterError(f"a head of tensors {sorted(names)[:6]} is not a layout the board "
                           "knows (BERT- or RoBERTa-style sequence classification)")
    return spec


def num_labels(spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> int:
    return int(np.asarray(tensors[spec["weight"]]).shape[0])
