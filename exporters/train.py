"""Train PEFT adapters on MiniLM for the offline text tasks, with the frozen seeded head.

The model is the pretrained MiniLM encoder (``transformers.AutoModel``); a sentence is its
attention-masked mean of the last hidden state, and logits come from the frozen task head
of :mod:`solar_edge.regen.heads` (regenerated from ``head_seed``), computed in torch exactly as
``head_logits`` does in numpy. Only the adapter's parameters train (cross-entropy, AdamW).

An adapter directory holds what ``PeftModel.save_pretrained`` writes
(``adapter_config.json`` + ``adapter_model.safetensors``) and ``task.json``: task name,
label names, head seed, adapter kind, training settings and held-out metrics.

LoRA-XS has no PEFT tuner of its own; it is trained as PEFT's TinyLoRA with ``u = r*r``
projections set to the standard basis of ``r x r`` matrices and saved with the
projections, so ``dW = B R A`` with ``R`` a free ``r x r`` core between the frozen
top-``r`` singular factors of ``W0`` (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from solar_edge.exporters.families.base import mean_pooled, unit
from solar_edge.exporters.families.text_encoder import default_model_dir, open_model
from solar_edge.exporters.heads import seeded_head
from solar_edge.exporters.tasks import Split, Task, accuracy_ci
from solar_edge.regen.heads import LOGIT_SCALE

ENCODER_LINEAR = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$"  # noqa: E501
QUERY_VALUE = ["query", "value"]


def minilm_path() -> str:
    return str(default_model_dir())


@dataclass(frozen=True)
class KindSpec:
    """One adapter kind: how to build its PEFT config, and its learning rate."""

    name: str
    description: str
    lr: float
    make_config: Callable[[int], Any]   # total training steps -> peft config
    post_init: Callable[[nn.Module], None] | None = None


def _lora(r: int, targets: Any) -> Callable[[int], Any]:
    def make(total_steps: int) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)

    return make


def _adalora(total_steps: int) -> Any:
    from peft import AdaLoraConfig

    tinit = max(1, total_steps // 5)
    tfinal = max(1, total_steps // 5)
    return AdaLoraConfig(
        init_r=12, target_r=8, lora_alpha=16, target_modules=QUERY_VALUE, lora_dropout=0.0,
        total_step=total_steps, tinit=tinit, tfinal=tfinal,
        deltaT=max(1, (total_steps - tinit - tfinal) // 10),
    )


def _vera(total_steps: int) -> Any:
    from peft import VeraConfig

    return VeraConfig(r=256, target_modules=QUERY_VALUE, vera_dropout=0.0,
                      projection_prng_key=0, save_projection=True)


def _tinylora(r: int, u: int, targets: Any) -> Callable[[int], Any]:
    def make(total_steps: int) -> Any:
        from peft import TinyLoraConfig

        return TinyLoraConfig(r=r, u=u, target_modules=targets, projection_seed=0,
                              save_projection=True, weight_tying=0.0)

    return make


def _standard_basis_projections(model: nn.Module) -> None:
    """Turn TinyLoRA (u = r*r) into LoRA-XS: P[i] = E_{i // r, i % r}, so R = reshape(v)."""
    for module in model.modules():
        projections = getattr(module, "tinylora_P", None)
        if projections is None or not hasattr(projections, "keys"):
            continue
        for key in list(projections.keys()):
            p = projections[key]
            u, r, _ = p.shape
            if u != r * r:
                raise ValueError(f"LoRA-XS needs u = r*r, got u={u}, r={r}")
            projections[key] = torch.eye(u, dtype=p.dtype).reshape(u, r, r).contiguous()


KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in [
        KindSpec("lora-qv-r8", "LoRA r=8 on query/value", 2e-3, _lora(8, QUERY_VALUE)),
        KindSpec("lora-all-r16", "LoRA r=16 on every encoder linear layer", 1e-3,
                 _lora(16, ENCODER_LINEAR)),
        KindSpec("adalora", "AdaLoRA init_r=12 -> target_r=8 on query/value", 5e-3, _adalora),
        KindSpec("vera", "VeRA r=256 on query/value, projections saved", 2e-2, _vera),
        KindSpec("lora-xs", "LoRA-XS r=16 core on every encoder linear layer (TinyLoRA, u=r*r)",
                 5e-3, _tinylora(16, 256, ENCODER_LINEAR), _standard_basis_projections),
        KindSpec("tinylora", "TinyLoRA r=2, u=4 on every encoder linear layer", 2e-2,
                 _tinylora(2, 4, ENCODER_LINEAR)),
    ]
}


@dataclass
class TrainConfig:
    kind: str = "lora-qv-r8"
    max_len: int = 64
    batch_size: int = 16
    epochs: float = 1.0
    steps: int | None = None       # optimiser steps; overrides epochs when set
    max_train: int | None = None   # cap on training examples (fast fixtures)
    max_test: int | None = None    # cap on held-out examples (fast fixtures); None = all
    head_seed: int = 1234
    seed: int = 0
    threads: int = 2
    lr: float | None = None        # None: the kind's default


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def load_base(path: str | None = None) -> tuple[Any, Any]:
    """``(tokenizer, model)`` of the text encoder at ``path`` (default: the embedded MiniLM)."""
    opened = open_model(Path(path) if path else default_model_dir())
    return opened.tokenizer, opened.module


torch_head = seeded_head


def logits_from_hidden(hidden: torch.Tensor, mask: torch.Tensor,
                       head: torch.Tensor) -> torch.Tensor:
    """The seeded head's logits ``LOGIT_SCALE * unit(mean pooled) @ head.T``."""
    return LOGIT_SCALE * unit(mean_pooled(hidden, mask)) @ head.T


def _batches(tokenizer: Any, texts: list[str], max_len: int, batch_size: int,
             order: np.ndarray) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_len,
                        padding=True, return_tensors="pt")
        out.append((idx, {k: enc[k] for k in ("input_ids", "attention_mask")}))
    return out


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, split: Split, head: torch.Tensor,
            max_len: int, batch_size: int = 64) -> np.ndarray:
    """Predicted labels; batches are length-sorted so padding stays short."""
    model.eval()
    lengths = np.array([len(t) for t in split.texts])
    order = np.argsort(lengths, kind="stable")
    preds = np.empty(len(split), dtype=np.int64)
    for idx, enc in _batches(tokenizer, split.texts, max_len, batch_size, order):
        hidden = model(**enc).last_hidden_state
        preds[idx] = logits_from_hidden(hidden, enc["attention_mask"], head).argmax(-1).numpy()
    return preds


def evaluate(model: nn.Module, tokenizer: Any, split: Split, head: torch.Tensor,
             max_len: int) -> dict[str, Any]:
    preds = predict(model, tokenizer, split, head, max_len)
    correct = int((preds == np.asarray(split.labels)).sum())
    acc, lo, hi = accuracy_ci(correct, len(split))
    return {"accuracy": acc, "ci95": [lo, hi], "correct": correct, "n": len(split)}


def _cap(split: Split, limit: int | None) -> Split:
    if limit is None or limit >= len(split):
        return split
    return Split(split.texts[:limit], split.labels[:limit])


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_adapter(task: Task, out_dir: str | Path, config: TrainConfig,
                  base: tuple[Any, Any] | None = None,
                  base_metrics: dict[str, Any] | None = None) -> TrainResult:
    """Train one adapter kind on ``task`` and save it (PEFT files + task.json) in ``out_dir``."""
    from peft import get_peft_model

    spec = KINDS[config.kind]
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer, model = base if base is not None else load_base()
    model = copy.deepcopy(model)  # get_peft_model edits the model in place
    hidden = int(model.config.hidden_size)
    head = torch_head(config.head_seed, task.num_labels, hidden)
    train = _cap(task.train, config.max_train)
    test = _cap(task.test, config.max_test)

    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.steps or max(1, round(steps_per_epoch * config.epochs))
    with warnings.catch_warnings():  # transformers' deprecation notes, seen by PEFT
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, spec.make_config(total_steps))
    if spec.post_init is not None:
        spec.post_init(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr or spec.lr, weight_decay=0.0)
    labels = torch.tensor(train.labels)
    rng = np.random.default_rng(config.seed)

    started = time.perf_counter()
    step = 0
    losses: list[float] = []
    while step < total_steps:
        order = rng.permutation(len(train))
        for idx, enc in _batches(tokenizer, train.texts, config.max_len, config.batch_size, order):
            if step >= total_steps:
                break
            peft_model.train()
            hidden_states = peft_model(**enc).last_hidden_state
            logits = logits_from_hidden(hidden_states, enc["attention_mask"], head)
            loss = nn.functional.cross_entropy(logits, labels[idx])
            loss.backward()
            optimizer.step()
            if config.kind == "adalora":
                peft_model.base_model.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    metrics = evaluate(peft_model, tokenizer, test, head, config.max_len)
    metrics["eval_seconds"] = time.perf_counter() - started
    metrics.update(
        train_seconds=train_seconds, steps=total_steps, train_examples=len(train),
        final_loss=float(np.mean(losses[-10:])), trainable_params=count_trainable(peft_model),
    )
    if base_metrics is not None:
        metrics["base"] = base_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    meta = {
        **adapted_modules(peft_model),
        "task": task.name,
        "labels": list(task.label_names),
        "head_seed": config.head_seed,
        "adapter_kind": spec.name,
        "description": spec.description,
        "train_config": asdict(config),
        "metrics": metrics,
    }
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    return TrainResult(out, metrics)


def adapted_modules(peft_model: nn.Module) -> dict[str, Any]:
    """PEFT's module order (TinyLoRA assigns its vectors by it) and each module's (out, in)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from solar_edge.methods.tensors import normalise_name

    order, shapes = [], {}
    for name, module in peft_model.named_modules():
        if isinstance(module, BaseTunerLayer):
            key = normalise_name(name)
            order.append(key)
            weight: Any = module.get_base_layer().weight
            shapes[key] = [int(weight.shape[0]), int(weight.shape[1])]
    return {"module_order": order, "module_shapes": shapes}


def evaluate_base(task: Task, config: TrainConfig,
                  base: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Accuracy of the pretrained encoder with the frozen head only (no adapter)."""
    torch.set_num_threads(config.threads)
    tokenizer, model = base if base is not None else load_base()
    head = torch_head(config.head_seed, task.num_labels, int(model.config.hidden_size))
    return evaluate(model, tokenizer, _cap(task.test, config.max_test), head, config.max_len)
