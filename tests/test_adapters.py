"""Reading PEFT adapters: dW from solar_edge.methods.peft_files equals what PEFT itself merges."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from solar_edge.errors import AdapterError
from solar_edge.methods.base import Adapter, LayerUpdate
from solar_edge.methods.matching import match_to_bundle
from solar_edge.methods.peft_files import adapter_from_tensors, read_adapter
from solar_edge.methods.tensors import normalise_name
from solar_edge.methods.tinylora import bert_module_order

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from solar_edge.exporters.train import KINDS, adapted_modules  # noqa: E402


def peft_deltas(base, adapter_dir: Path) -> dict[str, np.ndarray]:
    """merge_and_unload(weight) - base weight for every adapted module, via PEFT itself."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    modules = [normalise_name(n) for n, m in model.named_modules()
               if isinstance(m, BaseTunerLayer)]
    merged = model.merge_and_unload()
    before = dict(base.named_parameters())
    after = dict(merged.named_parameters())
    return {m: (after[m + ".weight"] - before[m + ".weight"]).detach().numpy().astype(np.float64)
            for m in modules if m + ".weight" in after}


def assert_matches_peft(adapter: Adapter, deltas: dict[str, np.ndarray]) -> None:
    assert set(adapter.updates) == set(deltas)
    for name, expected in deltas.items():
        got = adapter.dense(name).astype(np.float64)
        assert got.shape == expected.shape, name
        assert np.abs(expected).max() > 1e-4, f"{name}: PEFT delta is zero, test is vacuous"
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=name)


def _random_batch(tokenizer, n: int = 2):
    return tokenizer(["Return the square root of x.", "Open a file and return a stream."][:n],
                     return_tensors="pt", padding=True)


def make_adapter(kind: str, base, tokenizer, out: Path, config=None) -> Path:
    """A PEFT adapter of ``kind`` with random (non-zero) trained values, saved as PEFT does.

    AdaLoRA runs a few real optimiser steps with rank allocation so that the saved adapter
    carries a pruned ``rank_pattern``.
    """
    from peft import get_peft_model

    torch.manual_seed(7)
    spec = KINDS[kind]
    model = get_peft_model(copy.deepcopy(base), config or spec.make_config(8))
    if spec.post_init is not None:
        spec.post_init(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    if kind == "adalora":
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        batch = _random_batch(tokenizer)
        for step in range(8):
            model.train()
            model(**batch).last_hidden_state.pow(2).mean().backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
    model.save_pretrained(str(out))
    (out / "task.json").write_text(json.dumps({"adapter_kind": kind, **adapted_modules(model)}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dense_update_equals_peft_merge(kind, minilm_base, tmp_path):
    tokenizer, base = minilm_base
    adapter_dir = make_adapter(kind, base, tokenizer, tmp_path / kind)
    adapter = read_adapter(adapter_dir)
    assert adapter.label == kind
    assert_matches_peft(adapter, peft_deltas(base, adapter_dir))
    if kind == "adalora":
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["rank_pattern"], "AdaLoRA did not prune: rank_pattern path untested"


@pytest.mark.slow
def test_lora_rslora_and_patterns_equal_peft_merge(minilm_base, tmp_path):
    from peft import LoraConfig

    tokenizer, base = minilm_base
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value"],
                        rank_pattern={"layer.1.attention.self.query": 2},
                        alpha_pattern={"value": 3})
    adapter_dir = make_adapter("lora-qv-r8", base, tokenizer, tmp_path / "rs", config)
    adapter = read_adapter(adapter_dir)
    assert adapter.updates["encoder.layer.1.attention.self.query"].A.shape[0] == 2
    assert_matches_peft(adapter, peft_deltas(base, adapter_dir))


@pytest.mark.slow
def test_tinylora_order_is_inferred_without_task_json(minilm_base, tmp_path):
    tokenizer, base = minilm_base
    adapter_dir = make_adapter("tinylora", base, tokenizer, tmp_path / "tiny")
    meta = json.loads((adapter_dir / "task.json").read_text())
    assert bert_module_order(meta["module_order"][::-1]) == meta["module_order"]
    (adapter_dir / "task.json").unlink()
    assert_matches_peft(read_adapter(adapter_dir), peft_deltas(base, adapter_dir))


@pytest.mark.slow
def test_trained_fixture_adapter(lora_adapter_dir, minilm_base):
    adapter = read_adapter(lora_adapter_dir)
    assert adapter.kind == "lora"
    assert adapter.task_meta["task"] == "stdlib-docs"
    assert len(adapter.task_meta["labels"]) == 6
    metrics = adapter.task_meta["metrics"]
    lo, hi = metrics["ci95"]
    assert lo <= metrics["accuracy"] <= hi and metrics["n"] == 256
    assert sorted(adapter.updates) == sorted(
        f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value"))
    assert all(u.B.shape == (384, 8) and u.A.shape == (8, 384) for u in adapter.updates.values())
    assert_matches_peft(adapter, peft_deltas(minilm_base[1], lora_adapter_dir))


# --- pure parsing and errors ----------------------------------------------------------

def _lora_tensors(prefix: str = "base_model.model.bert.", r: int = 2,
                  bias: int = 0) -> dict[str, np.ndarray]:
    """A LoRA on one 5 x 6 module; ``bias`` values give ``lora_B`` a bias (lora_bias=True)."""
    rng = np.random.default_rng(0)
    name = prefix + "encoder.layer.0.attention.self.query"
    out = {f"{name}.lora_A.weight": rng.standard_normal((r, 6)).astype(np.float32),
           f"{name}.lora_B.weight": rng.standard_normal((5, r)).astype(np.float32)}
    if bias:
        out[f"{name}.lora_B.bias"] = rng.standard_normal(bias).astype(np.float32)
    return out


def test_lora_bias_is_a_bias_delta_scaled_like_the_factors():
    tensors = _lora_tensors(bias=5)
    adapter = adapter_from_tensors("LORA", {"r": 2, "lora_alpha": 6, "lora_bias": True}, tensors)
    (name, delta), = adapter.extras.bias_deltas.items()
    assert name == "encoder.layer.0.attention.self.query" and not adapter.extras.biases
    bias = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.bias"]
    np.testing.assert_allclose(delta, bias * 3.0, rtol=1e-6)


@pytest.mark.parametrize("key", ["bert.encoder.layer.0.attention.self.query",
                                 r"^bert\.encoder\.layer\.0\..*", "layer.0.attention.self.query",
                                 "query"])
def test_patterns_match_the_module_path_peft_matched(key):
    """PEFT matches ``rank_pattern`` / ``alpha_pattern`` keys against the module's path in
    the model it wrapped (``bert.encoder...`` for a classifier), full or by its end."""
    tensors = _lora_tensors()
    config = {"r": 4, "lora_alpha": 2, "rank_pattern": {key: 2}, "alpha_pattern": {key: 8}}
    (update,) = adapter_from_tensors("LORA", config, tensors).updates.values()
    B = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    np.testing.assert_allclose(update.B, B * 4.0, rtol=1e-6)  # alpha 8 / r 2, not 2 / 4


def test_names_are_normalised_and_scaling_folded():
    tensors = _lora_tensors()
    updates = adapter_from_tensors("LORA", {"r": 2, "lora_alpha": 6}, tensors).updates
    (name, update), = updates.items()
    assert name == "encoder.layer.0.attention.self.query"
    B = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    np.testing.assert_allclose(update.B, B * 3.0, rtol=1e-6)
    assert normalise_name("base_model.model.model.layers.0.q_proj") == "layers.0.q_proj"


@pytest.mark.parametrize("peft_type, config, tensors, message", [
    ("LOHA", {}, _lora_tensors(), "unsupported adapter type"),
    ("LORA", {"r": 3, "lora_alpha": 6}, _lora_tensors(), "rank 2 in tensors, 3 in config"),
    ("LORA", {"lora_alpha": 6}, _lora_tensors(), "lacks 'r'"),
    ("LORA", {"r": 2, "lora_alpha": 2, "use_dora": True}, _lora_tensors(), "DoRA"),
    ("LORA", {"r": 2, "lora_alpha": 2},
     {k: v for k, v in _lora_tensors().items() if "lora_A" in k}, "missing tensors"),
    ("LORA", {"r": 2, "lora_alpha": 2},
     {**_lora_tensors(), "base_model.model.classifier.weight": np.zeros((2, 2), np.float32)},
     "cannot carry"),
    ("LORA", {"r": 2, "lora_alpha": 2}, {}, "no layer updates"),
    ("VERA", {"r": 2}, _lora_tensors(), "vera_A"),
    ("LORA", {"r": 2, "lora_alpha": 2}, _lora_tensors(bias=5), "without lora_bias=True"),
    ("LORA", {"r": 2, "lora_alpha": 2, "init_lora_weights": "pissa"}, _lora_tensors(),
     "path_initial_model_for_weight_conversion"),
    ("LORA", {"r": 2, "lora_alpha": 2, "init_lora_weights": "pissa_niter_4"}, _lora_tensors(),
     "init_lora_weights='pissa_niter_4'"),
    ("LORA", {"r": 2, "lora_alpha": 2, "init_lora_weights": "olora"}, _lora_tensors(),
     "not the bundle's weights"),
    ("LORA", {"r": 2, "lora_alpha": 2, "layer_replication": [[0, 3], [0, 3]]},
     _lora_tensors(), "layer_replication"),
    ("LORA", {"r": 2, "lora_alpha": 2, "alora_invocation_tokens": [5, 6]}, _lora_tensors(),
     "aLoRA"),
    ("LORA", {"r": 2, "lora_alpha": 2},
     {"base_model.model.embeddings.patch_embeddings.projection.lora_A.weight":
      np.ones((2, 1, 4, 4), np.float32),
      "base_model.model.embeddings.patch_embeddings.projection.lora_B.weight":
      np.ones((8, 2, 1, 1), np.float32)}, "a LoRA on a convolution"),
    ("LORA", {"r": 2, "lora_alpha": 2, "lora_bias": True}, _lora_tensors(bias=4),
     "lora_B bias of shape"),
])
def test_bad_adapters_raise_adapter_error(peft_type, config, tensors, message):
    with pytest.raises(AdapterError, match=message):
        adapter_from_tensors(peft_type, config, tensors)


def test_shape_mismatch_raises():
    tensors = _lora_tensors()
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    tensors[key] = np.zeros((5, 3), np.float32)
    with pytest.raises(AdapterError, match="rank|shape"):
        adapter_from_tensors("LORA", {"r": 2, "lora_alpha": 2}, tensors)


def test_read_adapter_file_errors(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(AdapterError, match="not a directory"):
        read_adapter(tmp_path / "nope")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                              "lora_alpha": 2}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 8)
    with pytest.raises(AdapterError, match="safetensors"):
        read_adapter(tmp_path)
    save_file(_lora_tensors(), str(tmp_path / "adapter_model.safetensors"))
    assert set(read_adapter(tmp_path).updates) == {"encoder.layer.0.attention.self.query"}


def test_match_to_bundle_maps_ids_checks_shapes_and_lists_unmatched():
    rng = np.random.default_rng(1)
    names = ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value")
    upd = {n: LayerUpdate(n, rng.standard_normal((4, 1)), rng.standard_normal((1, 3)))
           for n in names}
    layers = [{"name": "encoder.layer.0.attention.self.key", "shape": [4, 3]},
              {"name": "encoder.layer.0.attention.self.query", "shape": [4, 3]},
              {"name": "encoder.layer.0.attention.self.value.weight", "shape": [4, 3]}]
    by_id = match_to_bundle(upd, layers)
    assert sorted(by_id) == [1, 2]
    assert by_id[1].name == "encoder.layer.0.attention.self.query"
    as_objects = [SimpleNamespace(name=d["name"], shape=tuple(d["shape"])) for d in layers]
    assert sorted(match_to_bundle(upd, as_objects)) == [1, 2]
    with pytest.raises(AdapterError, match="does not fit"):
        match_to_bundle(upd, [dict(d, shape=[4, 5]) for d in layers])
    with pytest.raises(AdapterError, match=r"1 adapter modules.*self\.value'\]"):
        match_to_bundle(upd, [d["name"] for d in layers[:2]])


def test_a_task_model_prefix_other_than_bert_still_finds_its_layer():
    """A RoBERTa classifier keeps its transformer under ``roberta.``: the same layers."""
    rng = np.random.default_rng(2)
    name = "roberta.encoder.layer.0.attention.self.query"
    upd = {name: LayerUpdate(name, rng.standard_normal((4, 1)), rng.standard_normal((1, 3)))}
    layers = [{"name": "encoder.layer.0.attention.self.key", "shape": [4, 3]},
              {"name": "encoder.layer.0.attention.self.query", "shape": [4, 3]}]
    assert sorted(match_to_bundle(upd, layers)) == [1]
    with pytest.raises(AdapterError, match=r"no bundle layer.*belongs to the task head.*"
                                           r"exclude_modules=\['roberta\.pooler\.dense'\]"):
        match_to_bundle({"roberta.pooler.dense": upd[name]}, layers)
    with pytest.raises(AdapterError, match="exported with"):
        match_to_bundle({"roberta.encoder.layer.0.output.dense": upd[name]}, layers)


@pytest.mark.parametrize("field,value", [
    ("r", "8"), ("r", None), ("r", 0), ("r", True), ("lora_alpha", "16"),
    ("lora_alpha", float("inf")), ("rank_pattern", {"query": "x"}), ("rank_pattern", [1]),
    ("alpha_pattern", [1]), ("alpha_pattern", {"query": None}), ("use_dora", "yes"),
    ("lora_bias", 1)])
def test_lora_config_fields_of_the_wrong_type_are_one_adapter_error(field, value):
    from solar_edge.errors import AdapterError
    from solar_edge.methods.lora import check_config

    good = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"query": 4},
            "alpha_pattern": {"value": 32.0}, "use_dora": False}
    check_config(good)
    with pytest.raises(AdapterError, match=f"adapter_config.json: {field}"):
        check_config({**good, field: value})


@pytest.mark.parametrize("config,message", [
    ({"bias": "weird"}, "bias must be"), ({"modules_to_save": "classifier"}, "modules_to_save"),
    ({"modules_to_save": [1]}, "modules_to_save")])
def test_extras_settings_of_the_wrong_type_are_one_adapter_error(config, message):
    from solar_edge.errors import AdapterError
    from solar_edge.methods.tensors import pattern_value, split_extras

    with pytest.raises(AdapterError, match=message):
        split_extras(config, {})
    with pytest.raises(AdapterError, match="not a regular expression"):
        pattern_value({"query(": 4}, "encoder.layer.0.query", 8)


def test_a_folder_of_saved_adapters_names_them(tmp_path):
    from solar_edge.errors import AdapterError
    from solar_edge.methods.peft_files import read_adapter

    for name in ("task-a", "task-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="subfolders: task-a, task-b"):
        read_adapter(tmp_path)
    (tmp_path / "task-a" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="safe_serialization=True"):
        read_adapter(tmp_path / "task-a")
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"x")
    with pytest.raises(AdapterError, match="looks like a whole model"):
        read_adapter(merged)


def _save_bf16_adapter(path: Path) -> dict[str, np.ndarray]:
    """A LoRA saved in bfloat16 as PEFT saves a bfloat16 model's adapter; returns what the
    tensors are, widened to float32 by torch."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    name = "base_model.model.encoder.layer.0.attention.self.query"
    tensors = {f"{name}.lora_A.weight": torch.randn(2, 6, generator=gen).bfloat16(),
               f"{name}.lora_B.weight": torch.randn(5, 2, generator=gen).bfloat16()}
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    return {k: v.float().numpy() for k, v in tensors.items()}


def test_a_bfloat16_adapter_is_read_exactly(tmp_path):
    from solar_edge.methods.peft_files import read_adapter

    want = _save_bf16_adapter(tmp_path / "a")
    (update,) = read_adapter(tmp_path / "a").updates.values()
    name = "base_model.model.encoder.layer.0.attention.self.query"
    np.testing.assert_array_equal(update.A, want[f"{name}.lora_A.weight"])
    np.testing.assert_array_equal(update.B, want[f"{name}.lora_B.weight"])
    assert update.A.dtype == np.float32


@pytest.mark.parametrize("mutate,message", [
    (lambda raw: raw[:5], "too short"),
    (lambda raw: (10 ** 9).to_bytes(8, "little") + raw[8:], "header of"),
    (lambda raw: raw[:8] + b"\xff" + raw[9:], "not JSON"),
    (lambda raw: raw[:-4], "data offsets"),
    (lambda raw: raw.replace(b'"BF16"', b'"Q4X1"', 1), "dtype"),
    (lambda raw: raw.replace(b'"shape":[2,6]', b'"shape":[3,6]', 1), "bytes for shape"),
])
def test_a_hostile_bfloat16_file_is_one_adapter_error(tmp_path, mutate, message):
    from solar_edge.errors import AdapterError
    from solar_edge.methods.bfloat16_file import read_bfloat16_file

    _save_bf16_adapter(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    raw = path.read_bytes()
    assert b'"shape":[2,6]' in raw
    path.write_bytes(mutate(raw))
    with pytest.raises(AdapterError, match=message):
        read_bfloat16_file(path)


@pytest.mark.parametrize("architecture", ["ViTForImageClassification",
                                          "BertForSequenceClassification"])
def test_a_classifier_adapter_without_its_head_is_refused(architecture):
    """Its model config names a classifier, but no head travels: the board would serve
    embeddings where PEFT serves the base model's classifier."""
    from dataclasses import replace

    from solar_edge.errors import AdapterError
    from solar_edge.exporters.adapter_checks import check_task_type

    adapter = adapter_from_tensors("LORA", {"r": 2, "lora_alpha": 2}, _lora_tensors())
    check_task_type(adapter)  # an embedding adapter
    with pytest.raises(AdapterError, match=f"a {architecture} adapter without its classifier"):
        check_task_type(replace(adapter, model_config={"architectures": [architecture]}))
