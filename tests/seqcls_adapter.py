"""A user's SEQ_CLS adapter for tests: standard PEFT LoRA r=4 on query/value of the real MiniLM,
labels ``LABELS``, every trainable part (classifier included) moved off its initial value by
seeded noise, saved by ``save_pretrained`` with the model's config.json (id2label)."""

from __future__ import annotations

import warnings
from pathlib import Path

LABELS = ["numeric", "files", "text"]


def make_seqcls_adapter(out: Path, model_dir: Path, **config) -> Path:
    """``config``: extra ``LoraConfig`` fields (``use_dora``, ``bias``, ``modules_to_save``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from solar_edge.exporters.families.text_encoder import quiet_loading

    torch.manual_seed(0)  # classifier and LoRA A initialisation: one adapter in every process
    with quiet_loading():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={v: i for i, v in enumerate(LABELS)})
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                          target_modules=["query", "value"], **config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # every trainable part, off its initial value
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    with warnings.catch_warnings():  # transformers deprecations PEFT triggers
        warnings.simplefilter("ignore", FutureWarning)
        pm.save_pretrained(str(out))
    model.config.save_pretrained(str(out))
    return out
