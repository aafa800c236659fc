"""The standard-PEFT SEQ_CLS trainer writes what PEFT writes, and PEFT reloads it exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from solar_edge.exporters.tasks import load_task  # noqa: E402

STEPS = 3
BATCH = 8
TEXTS = 6


@pytest.fixture(scope="module")
def task():
    return load_task("pydoc-topics")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("kind", ["seqcls-lora-qv-r8", "seqcls-dora-qv-r8"])
def test_seqcls_adapter_is_plain_peft(tmp_path, minilm_model_dir, task, kind):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from solar_edge.exporters.families.text_encoder import quiet_loading
    from solar_edge.exporters.train_peft import SeqClsConfig, predict_logits, train_seqcls

    config = SeqClsConfig(kind=kind, base_dir=str(minilm_model_dir), steps=STEPS,
                          batch_size=BATCH, max_train=STEPS * BATCH, max_test=16)
    head_only = {"accuracy": 0.5, "ci95": [0.3, 0.7], "correct": 8, "n": 16}
    result = train_seqcls(task, tmp_path / kind, config, head_only=head_only)
    out = result.out_dir

    assert {"adapter_config.json", "adapter_model.safetensors", "config.json",
            "metrics.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "task.json").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert "classifier" in adapter_config["modules_to_save"]
    assert adapter_config["use_dora"] is (kind == "seqcls-dora-qv-r8")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert "base_model.model.classifier.weight" in keys
    assert any("lora_magnitude_vector" in k for k in keys) is (kind == "seqcls-dora-qv-r8")
    model_config = json.loads((out / "config.json").read_text())
    id2label = {int(i): name for i, name in model_config["id2label"].items()}
    assert [id2label[i] for i in range(task.num_labels)] == list(task.label_names)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["steps"] == STEPS
    assert metrics["ci95"][0] <= metrics["accuracy"] <= metrics["ci95"][1]
    assert metrics["head_only"]["accuracy"] == 0.5
    assert len(metrics["lora_modules"]) == 12  # query/value of 6 layers, no pooler

    texts = task.test.texts[:TEXTS]
    trained = predict_logits(result.model, result.tokenizer, texts, config.max_len)
    with quiet_loading():
        base = AutoModelForSequenceClassification.from_pretrained(
            str(minilm_model_dir), num_labels=task.num_labels)
    reloaded = PeftModel.from_pretrained(base, str(out))
    again = predict_logits(reloaded, result.tokenizer, texts, config.max_len)
    np.testing.assert_allclose(again, trained, atol=1e-5, rtol=0)


def test_kinds_registry():
    from solar_edge.exporters.train_peft import HEAD_ONLY, KINDS, NOT_POOLER

    assert set(KINDS) == {"seqcls-lora-qv-r8", "seqcls-lora-all-r16", "seqcls-dora-qv-r8",
                          HEAD_ONLY}
    assert KINDS[HEAD_ONLY].make_config is None
    config = KINDS["seqcls-lora-all-r16"].make_config()
    assert config.task_type == "SEQ_CLS" and config.r == 16 and config.lora_alpha == 32
    assert set(config.target_modules) == {"query", "key", "value", "dense"}
    assert list(config.exclude_modules) == NOT_POOLER
    assert KINDS["seqcls-dora-qv-r8"].make_config().use_dora


def test_lora_all_adapts_every_encoder_linear_but_not_the_pooler(minilm_model_dir, task):
    from solar_edge.exporters.train_peft import KINDS, _prepare, load_classifier, lora_modules

    _, model = load_classifier(task, str(minilm_model_dir))
    adapted = lora_modules(_prepare(model, KINDS["seqcls-lora-all-r16"]))
    suffixes = ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"]
    expected = [f"base_model.model.bert.encoder.layer.{i}.{s}" for i in range(6)
                for s in suffixes]
    assert adapted == expected
    assert not any("pooler" in name or "classifier" in name for name in adapted)


def test_head_only_baseline_trains_the_classifier_alone(tmp_path, minilm_model_dir, task):
    from safetensors import safe_open

    from solar_edge.exporters.train_peft import HEAD_ONLY, SeqClsConfig, train_seqcls

    config = SeqClsConfig(kind=HEAD_ONLY, base_dir=str(minilm_model_dir), steps=5,
                          batch_size=BATCH, max_train=2 * BATCH, max_test=16)
    out = train_seqcls(task, tmp_path / HEAD_ONLY, config).out_dir
    with safe_open(str(out / "head.safetensors"), "pt") as f:
        assert set(f.keys()) == {"weight", "bias"}
        assert tuple(f.get_tensor("weight").shape) == (task.num_labels, 384)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == task.num_labels * 385
    assert metrics["n"] == 16 and "head_only" not in metrics
    assert json.loads((out / "config.json").read_text())["id2label"]["0"] == task.label_names[0]
