"""Train adapters the way a typical user would: standard PEFT for sequence classification.

The model is ``AutoModelForSequenceClassification`` over the base encoder (default: the
embedded MiniLM) with the task's ``id2label``; its own classifier (on the pooled output)
gives the logits, and cross-entropy on them trains with a plain AdamW loop. LoRA/DoRA
kinds wrap it with ``get_peft_model(model, LoraConfig(task_type="SEQ_CLS", ...))``, so the
classifier trains too (PEFT's default ``modules_to_save`` for SEQ_CLS). The
``seqcls-head-only`` baseline freezes the encoder and trains the classifier alone.

An adapter directory holds exactly what ``PeftModel.save_pretrained`` writes
(``adapter_config.json`` + ``adapter_model.safetensors``), the classification model's
``config.json`` (with ``id2label``) and ``metrics.json`` (held-out accuracy with a Wilson 95%
CI, training settings, the head-only baseline). No ``task.json``: the seeded-head
convention of :mod:`solar_edge.exporters.train` does not apply here. The head-only baseline
saves ``head.safetensors`` (the classifier's state dict) + ``config.json`` + ``metrics.json``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from solar_edge.exporters.families.text_encoder import default_model_dir, quiet_loading
from solar_edge.exporters.tasks import Split, Task, accuracy_ci
from solar_edge.exporters.train import _batches, _cap, count_trainable

QUERY_VALUE = ["query", "value"]
# Every Linear of the encoder (attention q/k/v, attention.output.dense, intermediate.dense,
# output.dense); the pooler's ``dense`` also ends in "dense" and is excluded.
ALL_LINEAR = ["query", "key", "value", "dense"]
NOT_POOLER = ["pooler.dense"]
HEAD_ONLY = "seqcls-head-only"


@dataclass(frozen=True)
class SeqClsKind:
    """One SEQ_CLS kind: its PEFT config (None: head only), learning rate and default steps.

    Head-only steps are cheap (features computed once), so it trains to convergence."""

    name: str
    description: str
    lr: float
    make_config: Callable[[], Any] | None
    steps: int = 300


def _lora(r: int, targets: list[str], exclude: list[str] | None = None,
          dora: bool = False) -> Callable[[], Any]:
    def make() -> Any:
        from peft import LoraConfig

        return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=targets,
                          exclude_modules=exclude, use_dora=dora)

    return make


KINDS: dict[str, SeqClsKind] = {
    spec.name: spec
    for spec in [
        SeqClsKind("seqcls-lora-qv-r8", "PEFT LoRA r=8 on query/value + classifier (SEQ_CLS)",
                   2e-3, _lora(8, QUERY_VALUE)),
        SeqClsKind("seqcls-lora-all-r16",
                   "PEFT LoRA r=16 on every encoder linear + classifier (SEQ_CLS)",
                   1e-3, _lora(16, ALL_LINEAR, NOT_POOLER), steps=200),
        SeqClsKind("seqcls-dora-qv-r8", "PEFT DoRA r=8 on query/value + classifier (SEQ_CLS)",
                   2e-3, _lora(8, QUERY_VALUE, dora=True)),
        SeqClsKind(HEAD_ONLY, "frozen base model (eval mode), trained classifier head only",
                   3e-2, None, steps=1000),
    ]
}


@dataclass
class SeqClsConfig:
    kind: str = "seqcls-lora-qv-r8"
    base_dir: str | None = None    # None: the embedded MiniLM
    max_len: int = 64
    batch_size: int = 16
    steps: int | None = None       # optimiser steps; None: the kind's default
    max_train: int | None = None   # cap on training examples (fast tests)
    max_test: int | None = None    # cap on held-out examples; None = all
    seed: int = 0
    threads: int = 2
    lr: float | None = None        # None: the kind's default
    weight_decay: float = 0.0


@dataclass
class SeqClsResult:
    out_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    model: Any = None              # the trained (PEFT) model, eval mode
    tokenizer: Any = None


def load_classifier(task: Task, base_dir: str) -> tuple[Any, Any]:
    """``(tokenizer, AutoModelForSequenceClassification)`` with the task's labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    id2label = dict(enumerate(task.label_names))
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=task.num_labels, id2label=id2label,
            label2id={name: i for i, name in id2label.items()})
    return tokenizer, model


def classifier_module(model: nn.Module) -> nn.Module:
    """The classification head (``classifier`` in BERT-like models, ``score`` in others)."""
    for name in ("classifier", "score"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(model).__name__} has no classifier/score head")


def lora_modules(peft_model: nn.Module) -> list[str]:
    """Names of the modules PEFT adapted (its tuner layers), in model order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]


@torch.no_grad()
def predict_logits(model: nn.Module, tokenizer: Any, texts: list[str], max_len: int,
                   batch_size: int = 64) -> np.ndarray:
    """Logits of ``texts`` in eval mode; batches are length-sorted so padding stays short."""
    model.eval()
    order = np.argsort(np.array([len(t) for t in texts]), kind="stable")
    logits = np.concatenate([model(**enc).logits.float().numpy()
                             for _, enc in _batches(tokenizer, texts, max_len, batch_size, order)])
    out = np.empty_like(logits)
    out[order] = logits
    return out


def evaluate(model: nn.Module, tokenizer: Any, split: Split, max_len: int) -> dict[str, Any]:
    preds = predict_logits(model, tokenizer, split.texts, max_len).argmax(-1)
    correct = int((preds == np.asarray(split.labels)).sum())
    acc, lo, hi = accuracy_ci(correct, len(split))
    return {"accuracy": acc, "ci95": [lo, hi], "correct": correct, "n": len(split)}


def _prepare(model: nn.Module, spec: SeqClsKind) -> nn.Module:
    """Wrap with PEFT, or (head only) freeze all but the classifier."""
    if spec.make_config is not None:
        from peft import get_peft_model

        with warnings.catch_warnings():  # transformers' deprecation notes, seen by PEFT
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, spec.make_config())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in classifier_module(model).parameters():
        p.requires_grad_(True)
    return model


def _steps(n: int, config: SeqClsConfig, steps: int) -> Iterator[np.ndarray]:
    """Index batches of ``steps`` optimiser steps, reshuffled every epoch."""
    rng = np.random.default_rng(config.seed)
    done = 0
    while done < steps:
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            if done >= steps:
                return
            yield order[start : start + config.batch_size]
            done += 1


def _loop(params: Iterable[nn.Parameter], loss_of: Callable[[np.ndarray], torch.Tensor],
          n: int, config: SeqClsConfig, steps: int, lr: float) -> list[float]:
    """Plain AdamW loop over shuffled batches of ``n`` examples; returns the losses."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    for idx in _steps(n, config, steps):
        loss = loss_of(idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _fit(model: nn.Module, tokenizer: Any, train: Split, config: SeqClsConfig,
         steps: int, lr: float) -> list[float]:
    """Cross-entropy on the model's own logits, every trainable parameter."""
    labels = torch.tensor(train.labels)

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        enc = tokenizer([train.texts[i] for i in idx], truncation=True,
                        max_length=config.max_len, padding=True, return_tensors="pt")
        feeds = {k: enc[k] for k in ("input_ids", "attention_mask")}
        return nn.functional.cross_entropy(model(**feeds).logits, labels[idx])

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return _loop(params, loss_of, len(train), config, steps, lr)


@torch.no_grad()
def classifier_inputs(model: nn.Module, tokenizer: Any, texts: list[str],
                      max_len: int) -> torch.Tensor:
    """What the frozen model (eval mode) feeds its classifier: BERT's pooled output."""
    seen: list[torch.Tensor] = []
    handle = classifier_module(model).register_forward_pre_hook(
        lambda _module, args: seen.append(args[0]))
    model.eval()
    order = np.argsort(np.array([len(t) for t in texts]), kind="stable")
    try:
        for _, enc in _batches(tokenizer, texts, max_len, 64, order):
            model(**enc)
    finally:
        handle.remove()
    if seen[0].dim() != 2:
        raise ValueError("head-only needs a classifier over (batch, hidden) features")
    feats = torch.empty(len(texts), seen[0].shape[1])
    feats[torch.as_tensor(order)] = torch.cat(seen)
    return feats


def _fit_head(model: nn.Module, tokenizer: Any, train: Split, config: SeqClsConfig,
              steps: int, lr: float) -> list[float]:
    """The classifier alone on the frozen encoder's features (computed once), with the
    model's own dropout before it; the same loop, cross-entropy and batches."""
    feats = classifier_inputs(model, tokenizer, train.texts, config.max_len)
    head = classifier_module(model)
    dropout = getattr(model, "dropout", None)
    dropout = dropout if isinstance(dropout, nn.Dropout) else nn.Identity()
    labels = torch.tensor(train.labels)
    head.train()
    dropout.train()
    return _loop(head.parameters(),
                 lambda idx: nn.functional.cross_entropy(head(dropout(feats[idx])), labels[idx]),
                 len(train), config, steps, lr)


def train_seqcls(task: Task, out_dir: str | Path, config: SeqClsConfig,
                 head_only: dict[str, Any] | None = None) -> SeqClsResult:
    """Train one SEQ_CLS kind on ``task`` and save it in ``out_dir``.

    ``head_only``: the head-only baseline's metrics on the same task, recorded in
    metrics.json as ``head_only``.
    """
    spec = KINDS[config.kind]
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # the classifier's initialisation
    base_dir = config.base_dir or str(default_model_dir())
    tokenizer, classifier = load_classifier(task, base_dir)
    model: Any = _prepare(classifier, spec)  # a PeftModel or the bare classifier
    train = _cap(task.train, config.max_train)
    test = _cap(task.test, config.max_test)
    steps = config.steps or spec.steps
    lr = config.lr or spec.lr

    started = time.perf_counter()
    fit = _fit if spec.make_config is not None else _fit_head
    losses = fit(model, tokenizer, train, config, steps, lr)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    metrics = evaluate(model, tokenizer, test, config.max_len)
    metrics.update(
        eval_seconds=time.perf_counter() - started, train_seconds=train_seconds, steps=steps,
        epochs=steps * config.batch_size / max(1, len(train)), train_examples=len(train),
        final_loss=float(np.mean(losses[-10:])), trainable_params=count_trainable(model),
        lr=lr, task=task.name, kind=spec.name, description=spec.description,
        base_model=base_dir, labels=list(task.label_names), train_config=asdict(config),
    )
    if spec.make_config is not None:
        metrics["lora_modules"] = lora_modules(model)
    if head_only is not None:
        metrics["head_only"] = {k: head_only[k] for k in ("accuracy", "ci95", "correct", "n")}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.make_config is not None:
        model.save_pretrained(str(out))
        model.base_model.model.config.save_pretrained(str(out))
    else:
        from safetensors.torch import save_file

        head = classifier_module(model).state_dict()
        head = {k: v.detach().contiguous() for k, v in head.items()}
        save_file(head, str(out / "head.safetensors"))
        model.config.save_pretrained(str(out))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return SeqClsResult(out, metrics, model.eval(), tokenizer)

