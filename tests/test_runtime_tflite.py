"""LiteRT backend on a real interpreter with a small hand-built TFLite graph, and on graphs
from the real converter.

The hand-built tests need no converter: a two-layer FULLY_CONNECTED graph is written with
LiteRT's own flatbuffer schema, its first layer carrying what the converter produces (a
folded LayerNorm affine ``W * gamma``, ``b + W @ beta``; attention's scalar moved into a
query, with or without that fold), located by the export stage's ``locate_weights``. The
bundle object handed to ``TfliteBackend`` there is a stand-in (named ``_StandInBundle``).
The MiniLM and tiny-ViT tests run the real converter (the optional ``convert`` extra,
``litert-torch``) and skip without it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
flatbuffers = pytest.importorskip("flatbuffers")

from ai_edge_litert import schema_py_generated as schema  # noqa: E402

from solar_edge.errors import RuntimeApplyError  # noqa: E402
from solar_edge.runtime.backends.tflite import (  # noqa: E402
    Placement,
    TfliteBackend,
    interpreter_class,
    patch_flatbuffer,
)
from solar_edge.runtime.patching import LayerPatch  # noqa: E402

IN, HID, OUT = 8, 12, 5


def _build_model(w1, b1, w2, b2) -> bytes:
    """x (1, IN) -> FC(w1, b1) -> FC(w2, b2) -> y (1, OUT), float32."""
    model = schema.ModelT()
    model.version = 3
    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    model.operatorCodes = [code]
    buffers = [schema.BufferT()]  # buffer 0: empty (activations)

    def tensor(name, shape, data=None):
        t = schema.TensorT()
        t.name, t.shape, t.type = name, list(shape), schema.TensorType.FLOAT32
        if data is None:
            t.buffer = 0
        else:
            b = schema.BufferT()
            b.data = np.ascontiguousarray(data, "<f4").view(np.uint8).reshape(-1).tolist()
            buffers.append(b)
            t.buffer = len(buffers) - 1
        return t

    tensors = [tensor("x", (1, IN)), tensor("w1", w1.shape, w1), tensor("b1", b1.shape, b1),
               tensor("h", (1, HID)), tensor("w2", w2.shape, w2), tensor("b2", b2.shape, b2),
               tensor("y", (1, OUT))]

    def fc(inputs, output):
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, inputs, [output]
        op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = schema.FullyConnectedOptionsT()
        return op

    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs = tensors, [0], [6]
    graph.operators = [fc([0, 1, 2], 3), fc([3, 4, 5], 6)]
    model.subgraphs, model.buffers = [graph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.fixture(scope="module")
def folded_model():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((HID, IN)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(HID).astype(np.float32) * 0.1
    w2 = rng.standard_normal((OUT, HID)).astype(np.float32) * 0.3
    b2 = rng.standard_normal(OUT).astype(np.float32) * 0.1
    gamma = (1.0 + 0.2 * rng.standard_normal(IN)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(IN)).astype(np.float32)
    data = _build_model(w1 * gamma[None, :], b1 + w1 @ beta, w2, b2)
    return SimpleNamespace(data=data, w1=w1, b1=b1, w2=w2, b2=b2, gamma=gamma, beta=beta)


def _placements(m):
    """Placements as the export stage records them (its ``locate_weights``)."""
    tflite_export = pytest.importorskip("solar_edge.exporters.tflite_export")
    found = tflite_export.locate_weights(
        m.data, {"fc1": (m.w1, m.b1), "fc2": (m.w2, m.b2)},
        {"fc1": (m.gamma.astype(np.float64), m.beta.astype(np.float64))})
    out = {}
    for lid, name in enumerate(["fc1", "fc2"]):
        rec = found[name]
        out[lid] = Placement(rec["weight"]["offset"], tuple(rec["weight"]["shape"]),
                             rec["bias"]["offset"] if rec["bias"] else None,
                             rec["input_scale"], rec["input_shift"],
                             rec["output_scale"] or 1.0)
    return out, found


def _reference(m, x, dw1, dw2):
    h = (x * m.gamma + m.beta) @ (m.w1 + dw1).T + m.b1
    return h @ (m.w2 + dw2).T + m.b2


def _run(data: bytes, x: np.ndarray) -> np.ndarray:
    interp = interpreter_class()(model_content=data)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()


def _factors(seed):
    rng = np.random.default_rng(seed)
    return {0: (rng.standard_normal((HID, 2)).astype(np.float32) * 0.2,
                rng.standard_normal((IN, 2)).astype(np.float32) * 0.2),
            1: (rng.standard_normal((OUT, 3)).astype(np.float32) * 0.2,
                rng.standard_normal((HID, 3)).astype(np.float32) * 0.2)}


def _patches(factors):
    return {lid: LayerPatch(factors=f) for lid, f in factors.items()}


def test_patched_flatbuffer_matches_numpy_with_folded_layernorm(folded_model):
    m = folded_model
    placements, found = _placements(m)
    assert found["fc1"]["input_scale"] is not None and found["fc1"]["input_shift"] is not None
    x = np.random.default_rng(1).standard_normal((1, IN)).astype(np.float32)
    zero = np.zeros((HID, IN), np.float32), np.zeros((OUT, HID), np.float32)
    assert np.allclose(_run(m.data, x), _reference(m, x, *zero), atol=1e-5)
    factors = _factors(2)
    pristine = bytes(m.data)
    patched = patch_flatbuffer(pristine, placements, _patches(factors))
    dws = [factors[i][0] @ factors[i][1].T for i in (0, 1)]
    got = _run(bytes(patched), x)
    assert np.allclose(got, _reference(m, x, *dws), atol=1e-5)
    assert np.abs(got - _run(m.data, x)).max() > 1e-2
    assert pristine == m.data  # the pristine model was only read


class _StandInBundle:
    """Stands in for a converted MiniLM bundle (converter not installed here)."""

    def __init__(self, path, m, found):
        self.tflite_path = path
        self.manifest = {"tflite": {"file": path.name, "seq_len": 0,
                                    "inputs": [{"name": "x", "graph_input": "x"}]}}
        self.arrays = {}
        layers = []
        for lid, (name, shape) in enumerate([("fc1", (HID, IN)), ("fc2", (OUT, HID))]):
            rec = dict(found[name])
            for key in ("input_scale", "input_shift"):
                if rec[key] is not None:
                    file = path.parent / f"{lid}.{key}.npy"
                    np.save(file, rec[key])
                    rec[key] = file.name
            layers.append(SimpleNamespace(id=lid, shape=shape, tflite=rec))
        self.layers = layers

    def file_path(self, rel):
        return self.tflite_path.parent / rel


def test_backend_stages_probes_and_swaps(folded_model, tmp_path):
    m = folded_model
    _, found = _placements(m)
    path = tmp_path / "model.tflite"
    path.write_bytes(m.data)
    backend = TfliteBackend(SimpleNamespace(bundle=_StandInBundle(path, m, found), profile={}))
    x = np.random.default_rng(3).standard_normal((4, IN)).astype(np.float32)
    base = backend.run({"x": x})[0]
    factors = _factors(4)
    staged = backend.prepare(_patches(factors))
    assert np.array_equal(backend.run({"x": x})[0], base)  # staging changes nothing served
    probe = backend.probe(staged, {"x": x})[0]
    backend.commit(staged)
    dws = [factors[i][0] @ factors[i][1].T for i in (0, 1)]
    assert np.array_equal(backend.run({"x": x})[0], probe)
    assert np.allclose(probe, _reference(m, x, *dws), atol=1e-5)
    backend.commit(backend.prepare({}))
    assert np.array_equal(backend.run({"x": x})[0], base)  # back to base bit for bit
    assert path.read_bytes() == m.data



def test_dora_scale_and_bias_delta_through_a_folded_layernorm(folded_model):
    """W = diag(s)(W0 + dW), b = b0 + db on a layer whose LayerNorm the converter folded."""
    m = folded_model
    placements, _ = _placements(m)
    factors = _factors(3)
    rng = np.random.default_rng(4)
    s1, db1 = (1 + 0.1 * rng.standard_normal(HID)).astype(np.float32), \
        (0.1 * rng.standard_normal(HID)).astype(np.float32)
    db2 = (0.1 * rng.standard_normal(OUT)).astype(np.float32)
    patches = {0: LayerPatch(factors[0], bias=db1, scale=s1), 1: LayerPatch(bias=db2)}
    x = np.random.default_rng(5).standard_normal((1, IN)).astype(np.float32)
    got = _run(bytes(patch_flatbuffer(m.data, placements, patches, {0: m.b1, 1: m.b2})), x)
    dw1 = factors[0][0] @ factors[0][1].T
    h = s1 * ((x * m.gamma + m.beta) @ (m.w1 + dw1).T) + m.b1 + db1
    assert np.allclose(got, h @ m.w2.T + m.b2 + db2, atol=1e-5)
    with pytest.raises(RuntimeApplyError, match="base bias"):
        patch_flatbuffer(m.data, placements, {0: LayerPatch(scale=s1)})


def test_dora_scale_and_bias_delta_without_a_fold_need_no_base_bias(folded_model):
    """fc2 has no folded LayerNorm: its stored bias is b0 itself, so DoRA + bias patches it
    without the bundle's base bias."""
    m = folded_model
    placements, found = _placements(m)
    assert found["fc2"]["input_shift"] is None
    factors = _factors(3)
    rng = np.random.default_rng(7)
    s2 = (1 + 0.1 * rng.standard_normal(OUT)).astype(np.float32)
    db2 = (0.1 * rng.standard_normal(OUT)).astype(np.float32)
    x = np.random.default_rng(8).standard_normal((1, IN)).astype(np.float32)
    got = _run(bytes(patch_flatbuffer(m.data, placements,
                                      {1: LayerPatch(factors[1], bias=db2, scale=s2)})), x)
    h = (x * m.gamma + m.beta) @ m.w1.T + m.b1
    dw2 = factors[1][0] @ factors[1][1].T
    assert np.allclose(got, s2 * (h @ (m.w2 + dw2).T) + m.b2 + db2, atol=1e-5)


def test_attention_scale_fold_patches_weight_and_bias(folded_model):
    """A scalar folded on top of the LayerNorm (attention's d**-0.25 on query and key)."""
    m = folded_model
    c = np.float32(32 ** -0.25)
    scaled = SimpleNamespace(**{**vars(m), "data": _build_model(
        c * m.w1 * m.gamma[None, :], c * (m.b1 + m.w1 @ m.beta), m.w2, m.b2)})
    placements, found = _placements(scaled)
    assert np.allclose(found["fc1"]["input_scale"], c * m.gamma, rtol=1e-5)
    factors = _factors(5)
    x = np.random.default_rng(6).standard_normal((1, IN)).astype(np.float32)
    got = _run(bytes(patch_flatbuffer(scaled.data, placements, _patches(factors))), x)
    dw1, dw2 = (factors[i][0] @ factors[i][1].T for i in (0, 1))
    h = c * ((x * m.gamma + m.beta) @ (m.w1 + dw1).T + m.b1)
    assert np.allclose(got, h @ (m.w2 + dw2).T + m.b2, atol=1e-5)


def _dora_patches(seed):
    """Factors, a DoRA scale and a bias delta on fc1; a bias delta on fc2."""
    factors = _factors(seed)
    rng = np.random.default_rng(seed + 100)
    s1 = (1 + 0.1 * rng.standard_normal(HID)).astype(np.float32)
    db1 = (0.1 * rng.standard_normal(HID)).astype(np.float32)
    db2 = (0.1 * rng.standard_normal(OUT)).astype(np.float32)
    patches = {0: LayerPatch(factors[0], bias=db1, scale=s1), 1: LayerPatch(bias=db2)}
    return patches, factors[0][0] @ factors[0][1].T, s1, db1, db2


def test_attention_scale_and_layernorm_fold_scale_bias_and_dora_by_c(folded_model):
    """Query/key carry c on top of the folded LayerNorm: a bias delta and the base bias of a
    DoRA patch enter the stored bias as c * db and c * b0 (recorded as output_scale)."""
    m = folded_model
    c = np.float32(16 ** -0.25)
    scaled = SimpleNamespace(**{**vars(m), "data": _build_model(
        c * m.w1 * m.gamma[None, :], c * (m.b1 + m.w1 @ m.beta), m.w2, m.b2)})
    placements, found = _placements(scaled)
    assert np.isclose(found["fc1"]["output_scale"], c) and found["fc2"]["output_scale"] is None
    patches, dw1, s1, db1, db2 = _dora_patches(9)
    x = np.random.default_rng(10).standard_normal((1, IN)).astype(np.float32)
    got = _run(bytes(patch_flatbuffer(scaled.data, placements, patches, {0: m.b1, 1: m.b2})), x)
    h = c * (s1 * ((x * m.gamma + m.beta) @ (m.w1 + dw1).T) + m.b1 + db1)
    assert np.allclose(got, h @ m.w2.T + m.b2 + db2, atol=1e-5)


def test_attention_scale_without_a_layernorm_fold_is_located_and_patched(folded_model):
    """The converter may keep a LayerNorm as its own op and still move c into the query:
    the stored layer is c * (W0, b0), explained without the LayerNorm (input_scale = c)."""
    m = folded_model
    c = np.float32(16 ** -0.25)
    data = _build_model(c * m.w1, c * m.b1, m.w2, m.b2)  # the graph's x is the LayerNorm's output
    unfolded = SimpleNamespace(**{**vars(m), "data": data})
    placements, found = _placements(unfolded)  # the model's LayerNorm is still named for fc1
    assert found["fc1"]["input_shift"] is None and np.isclose(found["fc1"]["output_scale"], c)
    assert np.allclose(found["fc1"]["input_scale"], c)
    patches, dw1, s1, db1, db2 = _dora_patches(11)
    x = np.random.default_rng(12).standard_normal((1, IN)).astype(np.float32)
    got = _run(bytes(patch_flatbuffer(data, placements, patches)), x)  # needs no base bias
    h = c * (s1 * (x @ (m.w1 + dw1).T) + m.b1 + db1)
    assert np.allclose(got, h @ m.w2.T + m.b2 + db2, atol=1e-5)


def test_a_bad_output_scale_in_the_manifest_is_a_bundle_error(folded_model, tmp_path):
    from solar_edge.errors import BundleError

    m = folded_model
    _, found = _placements(m)
    path = tmp_path / "model.tflite"
    path.write_bytes(m.data)
    for bad in ("0.5", 0.0, float("nan"), True):
        bundle = _StandInBundle(path, m, found)
        bundle.layers[0].tflite["output_scale"] = bad
        with pytest.raises(BundleError, match="output_scale"):
            TfliteBackend(SimpleNamespace(bundle=bundle, profile={}))


@pytest.mark.slow
def test_minilm_tflite_bundle_serves_like_onnx_after_apply(tmp_path):
    """Real MiniLM for the rpi4 profile (needs the ``convert`` extra: litert-torch)."""
    pytest.importorskip("litert_torch")
    from solar_edge.encode.solar import CodecConfig, encode
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.format import signing
    from solar_edge.format.packet import PacketHeader
    from solar_edge.format.writer import encode_packet
    from solar_edge.methods.base import LayerUpdate
    from solar_edge.runtime.engine import EdgeRuntime

    out = tmp_path / "rpi4"
    export_bundle(None, "rpi4", out)
    tfl = EdgeRuntime(out, [(key := signing.generate_private_key()).public_key()])
    assert tfl.mechanism == "tflite"
    ort_rt = EdgeRuntime(out, [key.public_key()], mechanism="initializer")
    texts = ["Return the absolute value of the argument.", "Open a file and return a stream."]
    assert np.abs(tfl.infer(texts) - ort_rt.infer(texts)).max() < 1e-4
    bundle = tfl.bundle.bundle
    rng = np.random.default_rng(0)
    lids = range(6)  # every kind of weight of the first encoder layer, folds included
    ups = {lid: LayerUpdate(bundle.layers[lid].name,
                            rng.standard_normal((bundle.layers[lid].shape[0], 4)) * 0.05,
                            rng.standard_normal((4, bundle.layers[lid].shape[1])) * 0.05)
           for lid in lids}
    res = encode(ups, {lid: bundle.layer_basis(lid) for lid in lids},
                 CodecConfig(representation="factored_core", max_rank=4))
    pkt = encode_packet(PacketHeader(bundle.fingerprint, "t", 1, {"task": "t"}), res.header,
                        res.records, key)
    before = tfl.infer(texts)
    tfl.apply(pkt)
    ort_rt.apply(pkt)
    got = tfl.infer(texts)
    assert np.abs(got - before).max() > 1e-3
    assert np.abs(got - ort_rt.infer(texts)).max() < 1e-4
    tfl.reset()
    assert np.array_equal(tfl.infer(texts), before)


def _tiny_vit(path, labels, biases):
    """A random ViT (16x16 gray, hidden 32, 2 layers) saved to ``path``, its LayerNorm affines
    moved off (1, 0) and, with ``biases``, its biases off 0, as after training."""
    import json

    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)},
                       initializer_range=0.2)  # weights large enough for attention to matter
    model = ViTForImageClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or (biases and name.endswith("bias")):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4], "image_std": [0.25], "rescale_factor": 1 / 255}))
    return path


def test_vit_whose_layernorms_the_converter_keeps_is_located_and_serves(tmp_path):
    """With its linear biases still 0 the converter kept the ViT's LayerNorms as their own
    ops and only moved attention's scale into query and key (once refused as "scaled in a
    way no LayerNorm explains"): located with ``input_scale = c`` and no shift, and a
    packet serves as the ONNX graph does."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("torch")
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.format import signing
    from solar_edge.format.packet import PacketHeader
    from solar_edge.format.records import (
        CodecHeader,
        LayerRecord,
        QuantizedValues,
        RecordKind,
        ValueFormat,
    )
    from solar_edge.format.writer import encode_packet
    from solar_edge.runtime.engine import EdgeRuntime

    base = _tiny_vit(tmp_path / "base", ["a", "b"], biases=False)
    bundle = export_bundle(str(base), "rpi4", tmp_path / "b").bundle
    q = bundle.layer_by_name("layers.0.attention.q_proj").tflite
    assert q["input_shift"] is None and np.isclose(q["output_scale"], 16 ** -0.25)
    assert np.allclose(np.load(bundle.file_path(q["input_scale"])), 16 ** -0.25)
    key = signing.generate_private_key()
    rng = np.random.default_rng(0)
    records = []
    for layer in bundle.layers[:6]:  # every kind of weight of the first layer
        out_f, in_f = layer.shape
        values = (0.2 * rng.standard_normal((out_f + in_f) * 2)).astype(np.float32)
        records.append(LayerRecord(layer.id, RecordKind.DENSE_FACTORS, out_f, in_f, 2,
                                   QuantizedValues(ValueFormat.FLOAT32, values.size,
                                                   raw=values)))
    packet = encode_packet(PacketHeader(bundle.fingerprint, "t", 1, {"task": "t"}),
                           CodecHeader(seed=0), records, key)
    tfl = EdgeRuntime(str(tmp_path / "b"), [key.public_key()])
    onnx_rt = EdgeRuntime(str(tmp_path / "b"), [key.public_key()], mechanism="initializer")
    images = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(4)]
    before = tfl.infer(images)
    assert np.abs(before - onnx_rt.infer(images)).max() < 1e-5
    tfl.apply(packet)
    onnx_rt.apply(packet)
    got = tfl.infer(images)
    assert np.abs(got - before).max() > 1e-3
    assert np.abs(got - onnx_rt.infer(images)).max() < 1e-5


def test_vit_exported_for_rpi4_serves_a_lossless_packet_like_onnx_and_peft(
        tmp_path, monkeypatch, capsys):
    """A tiny random-initialised ViT through ``solar-edge export --device rpi4`` (the real
    converter) and ``solar-edge run --image``: a signed lossless DoRA packet with trained
    biases and a head, on query (attention's scale moved into weight and bias) and other
    layers, answers as ONNX Runtime and PEFT's merge do."""
    pytest.importorskip("litert_torch")
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import json

    from cli_main import run_main
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification

    from solar_edge.exporters.compress import prepare_adapter, sign_packet
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.peft_files import read_adapter
    from solar_edge.runtime.engine import EdgeRuntime

    labels = ["a", "b", "c"]
    base = _tiny_vit(tmp_path / "base", labels, biases=True)
    code, _, err = run_main(monkeypatch, capsys, "export", str(base), "--device", "rpi4",
                            "--out", str(tmp_path / "b"))
    assert code == 0, err
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest["profile"]["backend"] == "tflite" and bundle.tflite_path.is_file()
    scaled = {layer.name: layer.tflite["output_scale"] for layer in bundle.layers
              if layer.tflite["output_scale"]}  # attention's head_dim**-0.25 moved in
    assert {n.rsplit(".", 1)[1] for n in scaled} == {"q_proj", "k_proj"}
    assert np.allclose(list(scaled.values()), 16 ** -0.25)

    peft_model = get_peft_model(
        ViTForImageClassification.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "fc1"],
                   modules_to_save=["classifier"], use_dora=True, bias="lora_only"))
    with torch.no_grad():  # every trainable part off its initial value, on its scale
        for name, p in peft_model.named_parameters():
            if "magnitude" in name:  # DoRA: within 10% of the weight's column norms
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)
            elif p.requires_grad:  # LoRA factors and biases, on the weights' scale
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.base_model.model.config.save_pretrained(tmp_path / "adapter")
    key = signing.generate_private_key()
    signing.save_public_key(key.public_key(), tmp_path / "key.pub")
    prep = prepare_adapter(read_adapter(tmp_path / "adapter"), bundle)
    packet, _ = sign_packet(prep, lossless_records(prep), key, "tiny")
    (tmp_path / "p.slr").write_bytes(packet)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(5)]
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(images):
        np.save(tmp_path / "imgs" / f"{i}.npy", image)

    def answers(*extra):
        code, out, err = run_main(monkeypatch, capsys, "run", "--bundle", str(tmp_path / "b"),
                                  "--packet", str(tmp_path / "p.slr"), "--trusted-key",
                                  str(tmp_path / "key.pub"), "--image",
                                  str(tmp_path / "imgs"), "--json", *extra)
        assert code == 0, err
        result = json.loads(out)
        rows = result["answers"]
        return result["mechanism"], np.array([a["logits"] for a in rows]), \
            [a["label"] for a in rows]

    mechanism, tfl, tfl_labels = answers()
    assert mechanism == "tflite"
    _, ort, ort_labels = answers("--mechanism", "initializer")
    x = np.stack([(im.astype(np.float32) / 255 - 0.4) / 0.25 for im in images])[:, None]
    with torch.no_grad():
        want = peft_model.merge_and_unload().eval()(pixel_values=torch.from_numpy(x)).logits
    want = want.numpy()
    assert np.abs(tfl - want).max() < 1e-4 and np.abs(tfl - ort).max() < 1e-4
    assert tfl_labels == ort_labels == [labels[i] for i in want.argmax(1)]

    rt = EdgeRuntime(str(tmp_path / "b"), [key.public_key()])
    onnx_rt = EdgeRuntime(str(tmp_path / "b"), [key.public_key()], mechanism="initializer")
    before = rt.infer(images)   # base model: unit embeddings
    assert np.abs(before - onnx_rt.infer(images)).max() < 1e-5
    feeds = rt.family.feeds(images)
    hidden = rt.run_graph(feeds)[0]
    rt.apply(packet)
    assert np.abs(rt.run_graph(feeds)[0] - hidden).max() > 1e-2  # the weights were patched
    assert np.abs(rt.infer(images) - want).max() < 1e-4
    rt.reset()
    assert np.array_equal(rt.infer(images), before)  # the pristine flatbuffer, bit for bit
