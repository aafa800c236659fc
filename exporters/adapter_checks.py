"""What ``compress`` refuses before it writes a packet: adapters the board would serve as
something they are not (another PEFT task type, ``modules_to_save`` it never applies, a
classifier without its pooler, a head of another width) or for another base model (DoRA
magnitudes far from this bundle's row norms). Each is one typed :class:`AdapterError` line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from solar_edge.errors import AdapterError
from solar_edge.format.bundle import Bundle
from solar_edge.methods.base import Adapter

DORA_BASE_TOLERANCE = 0.5  # median |m - |W0|_row| / |W0|_row a DoRA adapter of this base keeps


def has_task_head(adapter: Adapter) -> bool:
    """Whether the adapter has class outputs: a trained head (``modules_to_save``) or the
    project's seeded head (``task.json`` labels and head seed). Fisher and the refit match
    them; without, only embeddings are served."""
    return bool(adapter.extras.head) or (bool(adapter.task_meta.get("labels"))
                                         and "head_seed" in adapter.task_meta)


def row_norms(w: np.ndarray) -> np.ndarray:
    """Each row's Euclidean norm, in float64 (DoRA's magnitudes are row norms)."""
    w64 = np.asarray(w, np.float64)
    return np.sqrt((w64 * w64).sum(axis=1))


def check_magnitudes(magnitudes: dict[int, np.ndarray], bundle: Bundle,
                     updates: dict[int, Any] | None = None) -> None:
    """PEFT starts DoRA from ``m = |W0 + dW|_row`` (``dW = 0`` for a LoRA initialised the
    usual way) and training moves it a little: magnitudes far from both this bundle's row
    norms and those of ``W0 + dW`` mean the adapter was trained on another base model."""
    def deviation(m: np.ndarray, norms: np.ndarray) -> float:
        return float(np.median(np.abs(m - norms) / np.maximum(norms, 1e-12)))

    for lid, m in magnitudes.items():
        w0 = np.asarray(bundle.base_weight(lid), np.float64)
        off = deviation(m, row_norms(w0))
        upd = (updates or {}).get(lid)
        if off > DORA_BASE_TOLERANCE and upd is not None:  # W0 + dW only where W0 is far
            off = deviation(m, row_norms(w0 + np.asarray(upd.B, np.float64)
                                         @ np.asarray(upd.A, np.float64)))
        if off > DORA_BASE_TOLERANCE:
            raise AdapterError(f"{bundle.layer(lid).name}: the adapter's DoRA magnitudes are "
                               f"{100 * off:.0f}% away from this bundle's weight norms: it "
                               "was trained on another base model")


def check_problem_type(adapter: Adapter, outputs: int) -> None:
    """The board serves single-label classifiers (softmax over the logits, argmax label), and
    ``--max-drop``, the fisher metric and the refit measure that: a regression or multi-label
    head would be served and measured as something it is not."""
    problem = (adapter.model_config or {}).get("problem_type")
    if problem == "regression" or outputs == 1:
        raise AdapterError("a regression head (one output, or problem_type 'regression'): the "
                           "board serves single-label classifiers only")
    if problem == "multi_label_classification":
        raise AdapterError("a multi-label head (problem_type 'multi_label_classification'): "
                           "the board serves single-label classifiers only")


def check_head_width(spec: dict[str, Any], tensors: dict[str, np.ndarray],
                     hidden: Any) -> None:
    """The head reads the base model's hidden states: its input width must be theirs."""
    first = spec.get("pooler")
    name = f"{first}.weight" if first and f"{first}.weight" in tensors else spec["weight"]
    width = int(np.asarray(tensors[name]).shape[-1])
    if isinstance(hidden, int) and width != hidden:
        raise AdapterError(f"the head's {name} reads {width} features, but this bundle's model "
                           f"has {hidden}: the adapter is for another base model")


SERVED_TASK_TYPES = ("SEQ_CLS", "FEATURE_EXTRACTION")  # or no task_type: embeddings
HEAD_MODULES = ("classifier", "pooler", "pre_classifier")  # what a board head applies
POOLER_MODEL_TYPES = ("bert", "ernie", "megatron-bert", "nezha")  # classifier reads the pooler


UNSERVED_HEADS = ("ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")
CLASSIFIERS = ("ForSequenceClassification", "ForImageClassification")


def check_task_type(adapter: Adapter, served: Any = None) -> None:
    """The board serves a sequence-classification head or embeddings (or, for a bundle whose
    manifest lists ``model.task_types``, those): any other PEFT task (TOKEN_CLS, CAUSAL_LM,
    QUESTION_ANS, ...) would be served as something it is not, and so would a head that
    ``config.json`` names as another model's (an adapter saved without ``task_type``) or a
    classifier (``SEQ_CLS``, or a ``config.json`` naming one) saved without its head: the
    bundle has no head of its own, so the board would serve embeddings."""
    task_type = adapter.config.get("task_type")
    if served:
        if task_type is not None and str(task_type).upper() not in served:  # None: plain LoRA
            raise AdapterError(f"task_type {task_type!r} is not served by this bundle's model: "
                               f"it serves {', '.join(served)}")
        return
    saved = adapter.model_config.get("architectures")
    architectures = [n for n in saved if isinstance(n, str)] if isinstance(saved, list) else []
    for name in architectures:
        if name.endswith(UNSERVED_HEADS):
            raise AdapterError(f"config.json names the model {name}: the board serves "
                               "sequence classifiers and embeddings, not that head")
    classifier = next((n for n in architectures if n.endswith(CLASSIFIERS)), None)
    if str(task_type).upper() == "SEQ_CLS":
        classifier = "SEQ_CLS"
    if classifier and not has_task_head(adapter):
        raise AdapterError(f"a {classifier} adapter without its classifier (no modules_to_save "
                           "tensors): the bundle keeps no head of its own, so the board would "
                           "serve embeddings; save the adapter with modules_to_save="
                           "['classifier'] (the head PEFT trained or the base model's)")
    if task_type is not None and str(task_type).upper() not in SERVED_TASK_TYPES:
        raise AdapterError(f"task_type {task_type!r} is not served by the board: supported are "
                           "SEQ_CLS (sequence classification) and FEATURE_EXTRACTION (or no "
                           "task_type: embeddings)")


def _modules(names: Any) -> list[str]:
    return sorted({str(n).rsplit(".", 1)[0] if str(n).endswith((".weight", ".bias")) else str(n)
                   for n in names})


def check_head_modules(tensors: dict[str, np.ndarray], spec: dict[str, Any] | None) -> None:
    """Every ``modules_to_save`` tensor must be one the board's head applies (the classifier
    and its pooler): anything else would be carried in the packet and never used."""
    if spec is None:
        stray = [n for n in tensors if n.split(".", 1)[0] not in HEAD_MODULES]
    else:
        pooler = spec.get("pooler")
        used = {spec["weight"], spec.get("bias")} | (
            {f"{pooler}.weight", f"{pooler}.bias"} if pooler else set())
        stray = [n for n in tensors if n not in used]
    if stray:
        modules = _modules(stray)
        shown = ", ".join(modules[:6]) + (f" and {len(modules) - 6} more" if len(modules) > 6
                                          else "")
        raise AdapterError(f"modules_to_save {shown}: neither the classifier head nor its "
                           "pooler, so the board would never apply them (save only "
                           "'classifier', and 'pooler' if trained)")


def check_pooler(spec: dict[str, Any], adapter: Adapter, bundle: Bundle) -> None:
    """A BERT-style classifier reads ``tanh(pooler(h[CLS]))``: without the pooler in the
    adapter or in the bundle (``head_parts``) the board would feed it ``h[CLS]`` instead."""
    if spec.get("pooler") or spec["weight"] != "classifier.weight":
        return
    model_type = (adapter.model_config.get("model_type")
                  or bundle.manifest.get("model", {}).get("model_type"))
    if model_type in POOLER_MODEL_TYPES:
        raise AdapterError(f"the {model_type} classifier reads the base model's pooler "
                           "(pooler.dense), which neither the adapter nor this bundle carries "
                           "(no head_parts in its manifest): export the bundle again with this "
                           "version, or save the pooler with modules_to_save")
