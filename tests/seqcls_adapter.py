"""A user's SEQ_CLS adapter for tests: standard PEFT LoRA on the real MiniLM (default r=4 on
query/value, labels ``LABELS``), every trainable part (classifier included) moved off its
initial value by seeded noise, saved by ``save_pretrained`` with the model's config.json."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

LABELS = ["numeric", "files", "text"]


def seqcls_peft_model(model_dir: Path, labels: list[str] = LABELS, r: int = 4,
                      targets: list[str] | None = None, noise: float = 0.05,
                      **config) -> tuple[Any, Any]:
    """``(peft_model, classification_model)``; ``config``: extra ``LoraConfig`` fields
    (``use_dora``, ``bias``, ``modules_to_save``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from solar_edge.exporters.families.text_encoder import quiet_loading

    torch.manual_seed(0)  # classifier and LoRA A initialisation: one adapter in every process
    with quiet_loading():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={v: i for i, v in enumerate(labels)})
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r,
                                          target_modules=targets or ["query", "value"],
                                          **config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # every trainable part, off its initial value
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    return pm, model


def save_adapter(pm: Any, model: Any, out: Path) -> Path:
    with warnings.catch_warnings():  # transformers deprecations PEFT triggers
        warnings.simplefilter("ignore", FutureWarning)
        pm.save_pretrained(str(out))
    model.config.save_pretrained(str(out))
    return out


def make_seqcls_adapter(out: Path, model_dir: Path, **config) -> Path:
    return save_adapter(*seqcls_peft_model(model_dir, **config), out)


def save_with_moved_head(pm: Any, out: Path, scale: float = 0.5) -> Path:
    """Move the ``modules_to_save`` head of PEFT model ``pm`` well off its initialisation
    (a "trained" head) and save the adapter with its model's config.json beside it."""
    import torch

    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * scale)
    pm.save_pretrained(out)
    pm.base_model.model.config.save_pretrained(out)
    return out
