"""The causal-lm family end to end on tiny random-initialised LLaMA and GPT-2 (Conv1D) models:
export (KV cache, LoRA slots) -> lossless signed packets -> board generation, equal token for
token to torch ``PeftModel.merge_and_unload()`` greedy decoding; adapters switched in one
session; sampling; the command; what is refused."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from causal_lm_models import (
    PROMPTS,
    lossless_packet,
    make_adapter,
    make_model,
    torch_greedy,
)

from solar_edge.errors import AdapterError, ExportError, GenerationError
from solar_edge.format import signing

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    from solar_edge.exporters.pipeline import export_bundle

    torch.set_num_threads(1)
    kind = request.param
    root = tmp_path_factory.mktemp(f"decoder-{kind}")
    model_dir = make_model(kind, root / "model")
    adapters = {f"{kind}-a": make_adapter(kind, model_dir, root / "a", seed=1),
                f"{kind}-b": make_adapter(kind, model_dir, root / "b", seed=2, rank=8)}
    result = export_bundle(str(model_dir), "x86-64", root / "bundle")
    key = signing.generate_private_key()
    packets = {aid: lossless_packet(path, result.bundle, key, aid)
               for aid, path in adapters.items()}
    return {"kind": kind, "root": root, "model": model_dir, "adapters": adapters,
            "bundle": result.bundle, "key": key, "packets": packets}


def _runtime(decoder: dict[str, Any], mechanism: str | None = None) -> Any:
    from solar_edge.runtime.engine import EdgeRuntime

    return EdgeRuntime(str(decoder["bundle"].root), [decoder["key"].public_key()],
                       mechanism=mechanism)


def test_graph_has_kv_cache_and_lora_slots_on_every_adaptable_linear(decoder: dict) -> None:
    bundle = decoder["bundle"]
    manifest = bundle.manifest
    layers = manifest["model"]["cache"]["layers"]
    inputs = [i["name"] for i in manifest["onnx"]["inputs"]]
    outputs = [o["name"] for o in manifest["onnx"]["outputs"]]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(layers)
                          for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(layers)
                                    for k in ("key", "value")]
    per_block = 7 if decoder["kind"] == "llama" else 4  # q k v o gate up down | 4 Conv1D
    assert len(bundle.layers) == per_block * layers
    assert not any("lm_head" in layer.name for layer in bundle.layers)
    lora = onnx.load(str(bundle.root / manifest["onnx"]["variants"]["lora"]),
                     load_external_data=False)
    slots = {i.name for i in lora.graph.input if i.name.endswith(".lora_A")}
    assert slots == {f"{layer['onnx']['initializer']}.lora_A" for layer in manifest["layers"]}
    # the plain-LoRA variant: the same A/B slots, no scale/bias slots, two nodes fewer a weight
    plain = onnx.load(str(bundle.root / manifest["onnx"]["variants"]["lora-plain"]),
                      load_external_data=False)
    plain_inputs = {i.name for i in plain.graph.input}
    assert slots <= plain_inputs
    assert not any(n.endswith((".lora_scale", ".lora_bias")) for n in plain_inputs)
    assert len(lora.graph.node) - len(plain.graph.node) == 2 * len(bundle.layers)


@pytest.mark.parametrize("mechanism", ["lora", "initializer"])
def test_greedy_equals_merged_peft_token_for_token_with_adapters_switched(
        decoder: dict, mechanism: str) -> None:
    rt = _runtime(decoder, mechanism)
    for packet in decoder["packets"].values():
        rt.stage(packet)
    order = [*decoder["adapters"], None]
    seen: dict[str | None, list[list[int]]] = {}
    for i, prompt in enumerate(PROMPTS * 2):  # switch before every prompt
        adapter = order[i % len(order)]
        rt.activate(adapter)
        ids = rt.family.encode(prompt)
        got = rt.generate(prompt, NEW_TOKENS)
        path = None if adapter is None else decoder["adapters"][adapter]
        assert got.ids == torch_greedy(decoder["model"], path, ids, NEW_TOKENS), (adapter, prompt)
        seen.setdefault(adapter, []).append(got.ids)
    # the adapters change what is generated (so the comparison above could fail)
    a, b = (seen[aid] for aid in decoder["adapters"])
    assert a != seen[None] and b != seen[None] and a != b


def _dora_adapter(model_dir: Path, out: Path) -> Path:
    """A random DoRA adapter whose magnitudes differ from ``|W0 + dW|`` (a row scale != 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                        target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.5 * torch.rand_like(param))
    model.save_pretrained(str(out))
    return out


def _slot_inputs(rt: Any) -> set[str]:
    return {i.name.rsplit(".", 1)[1] for i in rt.backend.session.get_overridable_initializers()
            if ".lora_" in i.name}


@pytest.mark.parametrize("mechanism", ["lora", "lora-native"])
def test_lora_serves_plain_packets_on_the_plain_graph_until_dora_needs_the_full_one(
        decoder: dict, tmp_path: Path, mechanism: str) -> None:
    """Plain packets run on the plain graph; once a DoRA packet needs the scale and bias
    slots, every adapter runs on the full graph and one session is held, not two."""
    if decoder["kind"] != "llama":
        pytest.skip("DoRA on the LLaMA decoder only")
    dora = _dora_adapter(decoder["model"], tmp_path / "dora")
    rt = _runtime(decoder, mechanism)
    assert _slot_inputs(rt) == {"lora_A", "lora_B"}  # base model: the plain graph
    plain_id = next(iter(decoder["packets"]))
    rt.apply(decoder["packets"][plain_id])
    assert _slot_inputs(rt) == {"lora_A", "lora_B"}
    ids = rt.family.encode(PROMPTS[0])
    plain_path = decoder["adapters"][plain_id]
    assert rt.generate(PROMPTS[0], NEW_TOKENS).ids == torch_greedy(
        decoder["model"], plain_path, ids, NEW_TOKENS)
    rt.stage(lossless_packet(dora, decoder["bundle"], decoder["key"], "dora"))
    for aid, path in (("dora", dora), (plain_id, plain_path), (None, None)):
        rt.activate(aid)
        assert _slot_inputs(rt) == {"lora_A", "lora_B", "lora_scale", "lora_bias"}, aid
        assert len(rt.backend._sessions) == 1
        got = rt.generate(PROMPTS[0], NEW_TOKENS).ids
        assert got == torch_greedy(decoder["model"], path, ids, NEW_TOKENS), aid
    # the row scale matters (so serving DoRA on the plain graph would be caught above)
    rt.activate("dora")
    staged = rt.backend._feeds(rt._active.patches)  # what both mechanisms feed
    scale = {k: v for k, v in staged.items() if k.endswith(".lora_scale")}
    assert scale and any(abs(float(v.mean()) - 1.0) > 0.05 for v in scale.values())


def test_decoder_bundles_default_to_lora_native_on_the_plain_graph(decoder: dict) -> None:
    rt = _runtime(decoder)
    assert rt.mechanism == "lora-native"
    rt.apply(next(iter(decoder["packets"].values())))
    assert _slot_inputs(rt) == {"lora_A", "lora_B"}


def test_sampling_is_seeded_and_top_k_one_is_greedy(decoder: dict) -> None:
    rt = _runtime(decoder)
    rt.apply(next(iter(decoder["packets"].values())))
    greedy = rt.generate(PROMPTS[0], NEW_TOKENS, stop_at_eos=False).ids
    top1 = rt.generate(PROMPTS[0], NEW_TOKENS, temperature=1.0, top_k=1, seed=5,
                       stop_at_eos=False).ids
    assert top1 == greedy
    runs = [rt.generate(PROMPTS[0], NEW_TOKENS, temperature=1.5, top_k=50, seed=s,
                        stop_at_eos=False).ids for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] != greedy


def test_streamed_pieces_are_the_text_and_timings_are_reported(decoder: dict) -> None:
    rt = _runtime(decoder)
    pieces: list[tuple[int, str]] = []
    out = rt.generate(PROMPTS[1], NEW_TOKENS, on_token=lambda t, s: pieces.append((t, s)))
    assert [t for t, _ in pieces] == out.ids
    shown = "".join(s for _, s in pieces)
    assert out.text.startswith(shown) and shown
    if not out.text.endswith("\ufffd"):  # nothing held back at the end
        assert shown == out.text
    assert 0 < out.first_token_ms <= out.total_ms


def test_bad_requests_are_generation_errors(decoder: dict) -> None:
    rt = _runtime(decoder)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        rt.generate(PROMPTS[0], 0)
    with pytest.raises(GenerationError, match="temperature"):
        rt.generate(PROMPTS[0], 4, temperature=-1.0)
    with pytest.raises(GenerationError, match="top_k"):
        rt.generate(PROMPTS[0], 4, temperature=1.0, top_k=-2)
    with pytest.raises(GenerationError, match="positions"):
        rt.generate(PROMPTS[0], 200)  # the tiny models have 96 positions
    with pytest.raises(GenerationError, match="token ids"):
        rt.generate([5, 10_000], 4)
    with pytest.raises(GenerationError, match="no tokens"):
        rt.generate("", 4)


def test_generate_command_streams_and_switches_in_one_session(decoder: dict,
                                                              tmp_path: Path) -> None:
    from click.testing import CliRunner

    from solar_edge.cli import cli

    pub = signing.save_public_key(decoder["key"], tmp_path / "key.pub")
    args = ["generate", "--bundle", str(decoder["bundle"].root), "--trusted-key", str(pub),
            "--prompt", PROMPTS[0], "--max-new-tokens", "8"]
    for aid, packet in decoder["packets"].items():
        (tmp_path / f"{aid}.pkt").write_bytes(packet)
        args += ["--packet", str(tmp_path / f"{aid}.pkt")]
    ids = [int(t) for t in json.loads(CliRunner().invoke(cli, ["generate", "--bundle", str(
        decoder["bundle"].root), "--prompt", PROMPTS[0], "--max-new-tokens", "1", "--json"]
    ).output)["runs"][0]["ids"]]
    assert len(ids) == 1
    switches = [a for aid in decoder["adapters"] for a in ("--switch", aid)]
    res = CliRunner().invoke(cli, [*args, *switches, "--json"])
    assert res.exit_code == 0, res.output
    runs = json.loads(res.output)["runs"]
    prompt_ids = None
    for run, (aid, path) in zip(runs, decoder["adapters"].items(), strict=True):
        from solar_edge.runtime.engine import EdgeRuntime

        if prompt_ids is None:
            rt = EdgeRuntime(str(decoder["bundle"].root), [decoder["key"].public_key()])
            prompt_ids = rt.family.encode(PROMPTS[0])
        assert run["adapter_id"] == aid
        assert run["ids"] == torch_greedy(decoder["model"], path, prompt_ids, 8)
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert text.output.startswith(f"[{list(decoder['adapters'])[-1]}] {PROMPTS[0]}")
    bad = CliRunner().invoke(cli, [*args, "--max-new-tokens", "500"])
    assert type(bad.exception).__name__ == "GenerationError"
    wrong = CliRunner().invoke(cli, ["run", "--bundle", str(decoder["bundle"].root), "--text",
                                     PROMPTS[0]])  # run answers encoders: it points to generate
    assert wrong.exit_code == 2 and "solar-edge generate" in wrong.output
    assert PROMPTS[0] not in bad.output  # a refused request echoes nothing before its error


def test_refused_adapters_and_profiles(decoder: dict, tmp_path: Path) -> None:
    from solar_edge.exporters.compress import prepare_adapter
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.methods.peft_files import read_adapter

    path = next(iter(decoder["adapters"].values()))
    wrong = tmp_path / "seqcls"
    shutil.copytree(path, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["task_type"] = "SEQ_CLS"
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="not served by this bundle's model"):
        prepare_adapter(read_adapter(wrong), decoder["bundle"])
    with pytest.raises(ExportError, match="TFLite"):  # no converter here, or no decoder TFLite
        export_bundle(str(decoder["model"]), "rpi4", tmp_path / "tflite-bundle")
    assert not (tmp_path / "tflite-bundle").exists()


def test_text_encoder_rules_still_refuse_causal_lm_adapters(decoder: dict) -> None:
    from solar_edge.exporters.adapter_checks import check_task_type
    from solar_edge.methods.peft_files import read_adapter

    adapter = read_adapter(next(iter(decoder["adapters"].values())))
    with pytest.raises(AdapterError, match="not served by the board"):
        check_task_type(adapter)  # a bundle without model.task_types (text encoders)
    check_task_type(adapter, decoder["bundle"].manifest["model"]["task_types"])


def test_a_decoder_lora_without_task_type_is_served_and_saved_modules_are_refused(
        decoder: dict, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from solar_edge.exporters.compress import prepare_adapter
    from solar_edge.methods.peft_files import read_adapter

    source = next(iter(decoder["adapters"].values()))
    plain = tmp_path / "no-task"
    shutil.copytree(source, plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "task_type": None}))
    prep = prepare_adapter(read_adapter(plain), decoder["bundle"])  # plain LoRA tensors
    assert len(prep.updates) == len(read_adapter(source).updates)

    saved = tmp_path / "lm-head"
    shutil.copytree(source, saved)
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    (saved / "adapter_config.json").write_text(json.dumps({**config,
                                                           "modules_to_save": ["lm_head"]}))
    with pytest.raises(AdapterError, match="decoder bundle serves the base model's lm_head"):
        prepare_adapter(read_adapter(saved), decoder["bundle"])


def test_a_qwen2_decoder_generates_what_merged_peft_generates(tmp_path: Path) -> None:
    """Another LLaMA-like architecture (biased q/k/v) through the same family code."""
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.runtime.engine import EdgeRuntime

    model_dir = make_model("qwen2", tmp_path / "model")
    adapter = make_adapter("qwen2", model_dir, tmp_path / "a", seed=1)
    bundle = export_bundle(str(model_dir), "x86-64", tmp_path / "bundle").bundle
    key = signing.generate_private_key()
    rt = EdgeRuntime(str(bundle.root), [key.public_key()])
    rt.stage(lossless_packet(adapter, bundle, key, "qwen2-a"))
    for adapter_id, path in (("qwen2-a", adapter), (None, None)):
        rt.activate(adapter_id)
        ids = rt.family.encode(PROMPTS[0])
        assert rt.generate(PROMPTS[0], NEW_TOKENS).ids == torch_greedy(
            model_dir, path, ids, NEW_TOKENS), adapter_id


@pytest.mark.parametrize(("kind", "why"), [
    ("mamba", "not supported: the decoder family serves attention with a key/value cache"),
    ("bloom", "has no input position_ids, which the board feeds"),
])
def test_unsupported_decoder_architectures_are_one_line_export_errors(
        tmp_path: Path, kind: str, why: str) -> None:
    from solar_edge.exporters.pipeline import export_bundle

    model_dir = make_model(kind, tmp_path / "model")
    with pytest.raises(ExportError, match=f"model_type '{kind}'.*{why}"):
        export_bundle(str(model_dir), "x86-64", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists() or not any((tmp_path / "bundle").iterdir())


def test_a_bundle_whose_model_does_not_generate_says_so(tiny_bundle_master: Path) -> None:
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(tiny_bundle_master), [signing.generate_private_key().public_key()])
    with pytest.raises(GenerationError, match="does not generate"):
        rt.generate("hello", 4)


def test_calibrated_compress_refits_to_next_token_distributions(decoder: dict,
                                                                tmp_path: Path) -> None:
    from causal_lm_models import CORPUS

    from solar_edge.exporters.compress import CompressOptions, compress_adapter

    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(line for t in CORPUS[:4] for line in t.splitlines() if line)
                     * 3 + "\n")
    path = next(iter(decoder["adapters"].values()))
    options = CompressOptions(budget=3000, metric="act", calib_data=texts,
                              model_dir=decoder["model"], refit_steps=15)
    out = compress_adapter(path, decoder["bundle"], decoder["key"], options, adapter_id="cal")
    assert out.refit_loss is not None
    before, after = out.refit_loss  # KL of next-token distributions against the adapter
    assert after < 0.95 * before
    rt = _runtime(decoder)
    assert rt.apply(out.data).adapter_id == "cal" and len(rt.generate(PROMPTS[0], 4).ids) == 4


def test_an_unpacked_decoder_packet_is_a_causal_lm_adapter_that_generates_the_same(
        decoder: dict, tmp_path: Path) -> None:
    from solar_edge.exporters.unpack import unpack_packet

    aid = f"{decoder['kind']}-a"
    result = unpack_packet(decoder["packets"][aid], decoder["bundle"], tmp_path / "u",
                           [decoder["key"].public_key()])
    assert result.task_type == "CAUSAL_LM" and result.head == []
    config = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] == (decoder["kind"] == "gpt2")  # Conv1D, or PEFT warns
    rt = _runtime(decoder)
    rt.apply(decoder["packets"][aid])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. fan_in_fan_out set for the user
        for prompt in PROMPTS[:3]:
            ids = rt.family.encode(prompt)
            assert torch_greedy(decoder["model"], tmp_path / "u", ids, NEW_TOKENS) == \
                rt.generate(prompt, NEW_TOKENS).ids


def test_max_drop_measures_a_decoder_by_its_next_tokens(decoder: dict) -> None:
    """Not by the cosine of its pooled logits, which stays near 1 for any packet: every
    position's next token, against the reference's (the drop) and the text's (accuracy)."""
    from solar_edge.exporters.target_search import BoardMeter, compare
    from solar_edge.format.reader import decode_packet
    from solar_edge.format.writer import encode_packet

    texts = [p * 3 for p in PROMPTS]
    meter = BoardMeter(str(decoder["bundle"].root), texts, None)

    def measured(aid: str):
        pkt = decode_packet(decoder["packets"][aid])
        return meter.measure(encode_packet(pkt.header, pkt.codec, pkt.records, meter.key))

    a, b = measured(f"{decoder['kind']}-a"), measured(f"{decoder['kind']}-b")
    family = meter.runtime.family
    assert a.predictions.shape == (sum(len(family.encode(t)) - 1 for t in texts),)
    assert a.outputs is None and a.accuracy is not None
    same = compare(a, a, 0, 0)
    assert same.drop == 0 and same.agreement == 100 and same.cosine is None
    other = compare(b, a, 0, 0)  # two adapters predict other next tokens somewhere
    assert other.agreement is not None and other.drop == pytest.approx(100 - other.agreement)
    assert other.drop > 0
