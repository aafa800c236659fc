"""Standard PEFT sequence-classification adapters on the real MiniLM bundle, end to end.

Adapters are built the way users build them (``AutoModelForSequenceClassification`` +
``LoraConfig(task_type="SEQ_CLS")``, saved with ``save_pretrained``), with every trainable
part moved off its initial value so that each one matters: LoRA factors, the classifier in
``modules_to_save``, trained biases (``bias="lora_only"``) and DoRA magnitudes. A packet that
carries them at float32 must serve PEFT's own logits on every patching mechanism.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402
from seqcls_adapter import LABELS, make_seqcls_adapter  # noqa: E402

from solar_edge.encode.extras import extra_records  # noqa: E402
from solar_edge.errors import AdapterError  # noqa: E402
from solar_edge.exporters.head_specs import head_spec  # noqa: E402
from solar_edge.format import signing  # noqa: E402
from solar_edge.format.bundle import load_bundle  # noqa: E402
from solar_edge.format.packet import PacketHeader  # noqa: E402
from solar_edge.format.records import (  # noqa: E402  # noqa: E402
    CodecHeader,
    LayerRecord,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet  # noqa: E402
from solar_edge.methods.matching import match_extras, match_to_bundle  # noqa: E402
from solar_edge.methods.peft_files import read_adapter  # noqa: E402

TEXTS = ["Return the absolute value of the argument.", "Open a file and return a stream.",
         "Split the string at the first occurrence of sep."]


_make = make_seqcls_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, minilm_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seqcls")
    return {"lora": _make(root / "lora", minilm_model_dir),
            "dora-bias": _make(root / "dora", minilm_model_dir, use_dora=True,
                               bias="lora_only")}


@pytest.fixture(scope="module")
def bundle_dir(minilm_variants_bundle) -> Path:
    return minilm_variants_bundle


def _peft_logits(adapter_dir: Path, minilm_model_dir: Path) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from solar_edge.exporters.families.text_encoder import quiet_loading

    with quiet_loading():
        base = AutoModelForSequenceClassification.from_pretrained(str(minilm_model_dir),
                                                                  num_labels=3)
        tok = AutoTokenizer.from_pretrained(str(minilm_model_dir))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def _float32(values: np.ndarray) -> QuantizedValues:
    x = np.asarray(values, np.float32).reshape(-1)
    return QuantizedValues(ValueFormat.FLOAT32, x.size, raw=x)


def _lossless_packet(adapter_dir: Path, bundle_dir: Path, key) -> bytes:
    """Every part at float32: LoRA factors as DENSE_FACTORS, extras as they are."""
    bundle = load_bundle(bundle_dir)
    adapter = read_adapter(adapter_dir)
    updates = match_to_bundle(adapter.updates, bundle.layers)
    matched = match_extras(adapter.extras, bundle.layers)
    records = [LayerRecord(lid, RecordKind.DENSE_FACTORS, u.B.shape[0], u.A.shape[1],
                           u.B.shape[1], _float32(np.concatenate([u.B.reshape(-1),
                                                                  u.A.T.reshape(-1)])))
               for lid, u in updates.items()]
    extras = extra_records(matched.head, matched.biases, matched.magnitudes, bundle,
                           tolerance=0.0, formats=(ValueFormat.FLOAT32,))
    spec = head_spec(matched.head, lambda name: bundle.head_part(name) is not None)
    meta = {"labels": adapter.labels, "head": {**spec, "tensors": extras.head_tensors}}
    return encode_packet(PacketHeader(bundle.fingerprint, adapter_dir.name, 1, meta),
                         CodecHeader(seed=0), records + extras.records, key)


def test_what_peft_writes_is_read_as_it_is(adapters):
    lora, dora = read_adapter(adapters["lora"]), read_adapter(adapters["dora-bias"])
    assert set(lora.extras.head) == {"classifier.weight", "classifier.bias"}
    assert lora.labels == LABELS and not lora.extras.biases and not lora.is_dora
    assert dora.is_dora and len(dora.extras.magnitudes) == 12 and len(dora.extras.biases) == 12
    assert all(name.endswith(("query", "value")) for name in dora.extras.biases)


@pytest.mark.parametrize("mechanism", ["lora", "initializer", "recreate", "iobinding"])
@pytest.mark.parametrize("kind", ["lora", "dora-bias"])
def test_lossless_packet_serves_peft_logits(adapters, bundle_dir, minilm_model_dir, kind,
                                            mechanism):
    from solar_edge.runtime.engine import EdgeRuntime

    key = signing.generate_private_key()
    data = _lossless_packet(adapters[kind], bundle_dir, key)
    rt = EdgeRuntime(str(bundle_dir), [key.public_key()], mechanism=mechanism)
    info = rt.apply(data)
    got = rt.infer(TEXTS)
    want = _peft_logits(adapters[kind], minilm_model_dir)
    assert got.shape == want.shape == (3, 3)
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert info.labels == LABELS
    assert rt.classify(TEXTS) == [LABELS[i] for i in want.argmax(-1)]


def test_a_trained_bias_the_bundle_cannot_patch_is_refused(adapters, minilm_bundle, tmp_path):
    src = load_bundle(minilm_bundle)
    layers = [{"name": layer.name, "shape": list(layer.shape)} for layer in src.layers
              if "value" not in layer.name]  # a bundle without the value layers
    adapter = read_adapter(adapters["dora-bias"])
    with pytest.raises(AdapterError, match="cannot patch"):
        match_extras(adapter.extras, layers)


def test_id2label_comes_from_the_saved_model_config(adapters, tmp_path):
    adir = tmp_path / "a"
    shutil.copytree(adapters["lora"], adir)
    config = json.loads((adir / "config.json").read_text())
    config["id2label"] = {"1": "b", "0": "a", "2": "c"}
    (adir / "config.json").write_text(json.dumps(config))
    assert read_adapter(adir).labels == ["a", "b", "c"]
    for id2label, want in ((["x", "y", "z"], ["x", "y", "z"]),          # a list: by position
                           ({"0": "x", "2": "y", "5": "z"}, None)):    # gaps: no names
        (adir / "config.json").write_text(json.dumps({**config, "id2label": id2label}))
        assert read_adapter(adir).labels == want
    (adir / "config.json").unlink()
    assert read_adapter(adir).labels is None


# --- the adapter-effect canary -----------------------------------------------------------

def _cli(*args: str):
    from click.testing import CliRunner

    from solar_edge.cli import cli

    return CliRunner().invoke(cli, list(args))


def _compress_cli(adapter: Path, bundle: Path, out: Path, *extra: str):
    return _cli("compress", str(adapter), "--bundle", str(bundle), "--budget", "30000",
                "--quiet", "--out", str(out), *extra)


@pytest.mark.parametrize("kind, key_name, error", [("update", "update_digest", "update digest"),
                                                    ("outputs", "canary", "canary")])
def test_a_packet_that_does_not_do_what_it_says_never_serves(adapters, bundle_dir, tmp_path,
                                                             kind, key_name, error):
    from solar_edge.errors import HealthCheckError
    from solar_edge.format.reader import decode_packet
    from solar_edge.runtime.engine import EdgeRuntime

    key_dir, out = tmp_path / "k", tmp_path / "p.slr"
    assert _cli("keygen", "--out", str(key_dir)).exit_code == 0
    result = _compress_cli(adapters["lora"], bundle_dir, out, "--signing-key",
                           str(key_dir / "signing.key"), "--canary", kind)
    assert result.exit_code == 0, result.output
    key = signing.load_private_key(key_dir / "signing.key")
    packet = decode_packet(out.read_bytes(), [key.public_key()])
    meta = packet.header.metadata
    assert len(meta[key_name]["digest"]) == 3
    assert ({"canary", "update_digest"} & set(meta)) == {key_name}  # one vouch, not both
    rt = EdgeRuntime(str(bundle_dir), [key.public_key()])
    rt.apply(out.read_bytes())  # the honest packet passes its own check
    serving = rt.infer(TEXTS)
    # the same signed claim over records that do less: the LoRA factors dropped
    lazy = [r for r in packet.records if r.kind == RecordKind.HEAD_TENSOR]
    forged = encode_packet(PacketHeader(packet.header.fingerprint, "lora", 2, meta),
                           packet.codec, lazy, key)
    with pytest.raises(HealthCheckError, match=error):
        rt.apply(forged)
    assert rt.active.version == 1 and np.array_equal(rt.infer(TEXTS), serving)


def test_without_a_vouch_the_packet_carries_neither_digest(adapters, bundle_dir, tmp_path):
    from solar_edge.format.reader import decode_packet

    out = tmp_path / "n.slr"
    assert _compress_cli(adapters["lora"], bundle_dir, out, "--no-canary").exit_code == 0
    meta = decode_packet(out.read_bytes()).header.metadata
    assert "canary" not in meta and "update_digest" not in meta


def _counting_probe(rt, monkeypatch) -> list[int]:
    """Record the batch size of every forward pass staging runs."""
    real, batches = rt.backend.probe, []

    def counting(staged, feeds):
        batches.append(len(next(iter(feeds.values()))))
        return real(staged, feeds)

    monkeypatch.setattr(rt.backend, "probe", counting)
    return batches


def _next_version_refused_on_nan_outputs(rt, packet_path: Path, key, real_probe,
                                         monkeypatch) -> None:
    """The packet's next version, staged while every forward pass gives NaN, is refused as
    non-finite and what served keeps serving."""
    from solar_edge.errors import HealthCheckError
    from solar_edge.format.reader import decode_packet

    serving = rt.infer(TEXTS)
    packet = decode_packet(packet_path.read_bytes(), [key.public_key()])
    again = encode_packet(PacketHeader(packet.header.fingerprint, packet.header.adapter_id, 2,
                                       packet.header.metadata), packet.codec, packet.records, key)
    monkeypatch.setattr(rt.backend, "probe", lambda staged, feeds: [
        np.full_like(o, np.nan) for o in real_probe(staged, feeds)])
    with pytest.raises(HealthCheckError, match="non-finite"):
        rt.apply(again)
    assert rt.active.version == 1 and np.array_equal(rt.infer(TEXTS), serving)


def test_a_canary_packet_costs_one_probe_whose_outputs_must_be_finite(adapters, bundle_dir,
                                                                      tmp_path, monkeypatch):
    """The canary's forward pass is also the health probe: one pass per apply, not two,
    and non-finite outputs on the canary inputs fail as such (not as a digest mismatch)."""
    from solar_edge.runtime.engine import EdgeRuntime

    key_dir, out = tmp_path / "k", tmp_path / "p.slr"
    assert _cli("keygen", "--out", str(key_dir)).exit_code == 0
    assert _compress_cli(adapters["lora"], bundle_dir, out, "--signing-key",
                         str(key_dir / "signing.key"), "--canary", "outputs").exit_code == 0
    key = signing.load_private_key(key_dir / "signing.key")
    rt = EdgeRuntime(str(bundle_dir), [key.public_key()])
    real = rt.backend.probe
    batches = _counting_probe(rt, monkeypatch)
    rt.apply(out.read_bytes())
    assert batches == [3]  # the three canary inputs, once
    _next_version_refused_on_nan_outputs(rt, out, key, real, monkeypatch)


@pytest.mark.parametrize("mechanism, passes", [("lora", []), ("lora-native", []),
                                               ("initializer", [1])])
def test_an_update_digest_packet_needs_a_forward_pass_only_on_merged_weights(
        adapters, bundle_dir, tmp_path, monkeypatch, mechanism, passes):
    """The default vouch is checked in weight space: the slot mechanisms, which serve the
    factors as they are, run no forward pass; a mechanism that merges weights on the board
    still runs the health input once, and its non-finite outputs fail."""
    from solar_edge.runtime.engine import EdgeRuntime

    key_dir, out = tmp_path / "k", tmp_path / "p.slr"
    assert _cli("keygen", "--out", str(key_dir)).exit_code == 0
    assert _compress_cli(adapters["dora-bias"], bundle_dir, out, "--signing-key",
                         str(key_dir / "signing.key")).exit_code == 0
    key = signing.load_private_key(key_dir / "signing.key")
    rt = EdgeRuntime(str(bundle_dir), [key.public_key()], mechanism=mechanism)
    real = rt.backend.probe
    batches = _counting_probe(rt, monkeypatch)
    rt.apply(out.read_bytes())
    assert batches == passes
    assert rt.checks.forward_passes == len(passes)
    if not passes:
        return
    _next_version_refused_on_nan_outputs(rt, out, key, real, monkeypatch)


# --- what the board cannot serve is refused at compress -------------------------------------

def _compress(adapter_dir: Path, bundle):
    from solar_edge.exporters.compress import CompressOptions, compress_adapter

    return compress_adapter(adapter_dir, bundle, signing.generate_private_key(),
                            CompressOptions(budget=300_000, canary="none"))


def test_a_task_type_the_board_cannot_serve_is_refused(adapters, minilm_bundle, tmp_path):
    adir = tmp_path / "tok"
    shutil.copytree(adapters["lora"], adir)  # classifier.weight/bias, as TOKEN_CLS saves them
    config = json.loads((adir / "adapter_config.json").read_text())
    config["task_type"] = "TOKEN_CLS"
    (adir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="TOKEN_CLS.*SEQ_CLS.*FEATURE_EXTRACTION") as info:
        _compress(adir, load_bundle(minilm_bundle))
    assert "\n" not in str(info.value)

    # saved without task_type, its config.json still says what its head is
    config.pop("task_type")
    (adir / "adapter_config.json").write_text(json.dumps(config))
    model_config = json.loads((adir / "config.json").read_text())
    model_config["architectures"] = ["BertForTokenClassification"]
    (adir / "config.json").write_text(json.dumps(model_config))
    with pytest.raises(AdapterError, match="BertForTokenClassification"):
        _compress(adir, load_bundle(minilm_bundle))

    # a SEQ_CLS adapter whose classifier was not saved would serve embeddings
    headless = tmp_path / "headless"
    shutil.copytree(adapters["lora"], headless)
    tensors = load_file(str(headless / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "classifier" not in k},
              str(headless / "adapter_model.safetensors"))
    config = json.loads((headless / "adapter_config.json").read_text())
    (headless / "adapter_config.json").write_text(json.dumps({**config,
                                                              "modules_to_save": None}))
    with pytest.raises(AdapterError, match="SEQ_CLS adapter without its classifier"):
        _compress(headless, load_bundle(minilm_bundle))


def test_modules_to_save_the_board_never_applies_are_refused(minilm_model_dir, minilm_bundle,
                                                             tmp_path):
    adir = _make(tmp_path / "ln", minilm_model_dir, modules_to_save=["LayerNorm"])
    assert any("LayerNorm" in name for name in read_adapter(adir).extras.head)
    with pytest.raises(AdapterError, match=r"modules_to_save embeddings\.LayerNorm, "
                                           r"encoder\.layer\.0\..*LayerNorm.* more") as info:
        _compress(adir, load_bundle(minilm_bundle))
    assert "\n" not in str(info.value)


def test_a_trained_pooler_is_carried_and_served(minilm_model_dir, minilm_bundle, tmp_path):
    from solar_edge.format.reader import decode_packet

    adir = _make(tmp_path / "pool", minilm_model_dir, modules_to_save=["pooler"])
    meta = decode_packet(_compress(adir, load_bundle(minilm_bundle)).data).header.metadata
    assert meta["head"]["pooler"] == "pooler.dense"
    assert {t["name"] for t in meta["head"]["tensors"]} == {
        "classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias"}


def _without_head_parts(bundle_dir: Path):
    from solar_edge.format.bundle import Bundle

    src = load_bundle(bundle_dir)
    assert src.head_part("pooler.dense.weight") is not None
    manifest = {k: v for k, v in src.manifest.items() if k != "head_parts"}
    return Bundle(src.root, manifest, src.layers)


def test_a_bundle_that_cannot_apply_the_pooler_is_refused(adapters, minilm_model_dir,
                                                          minilm_bundle, tmp_path):
    old = _without_head_parts(minilm_bundle)
    with pytest.raises(AdapterError, match="pooler.*head_parts"):
        _compress(adapters["lora"], old)  # classifier only: it reads the base pooler
    carried = _make(tmp_path / "pool", minilm_model_dir, modules_to_save=["pooler"])
    assert _compress(carried, old).metadata["head"]["pooler"] == "pooler.dense"


@pytest.mark.parametrize("pooler", [False, True])
@pytest.mark.parametrize("with_canary", [False, True])
def test_a_head_of_another_width_is_a_typed_error_before_staging(minilm_bundle, pooler,
                                                                 with_canary, monkeypatch):
    """A signed, hand-made packet whose classifier reads 7 features on a 384-wide model."""
    from solar_edge.errors import RuntimeApplyError
    from solar_edge.regen import canary
    from solar_edge.runtime.engine import EdgeRuntime

    bundle = load_bundle(minilm_bundle)
    key = signing.generate_private_key()
    head = {"type": "sequence-classification", "pooling": "cls", "activation": "tanh",
            "weight": "classifier.weight", "bias": "classifier.bias",
            "tensors": [{"name": "classifier.weight", "shape": [3, 7]},
                        {"name": "classifier.bias", "shape": [3]}]}
    if pooler:
        head["pooler"] = "pooler.dense"  # the bundle's, 384 -> 384
    meta: dict = {"labels": LABELS, "head": head}
    if with_canary:
        meta["canary"] = {"digest": canary.placeholder(len(bundle.manifest["canary"]["inputs"])),
                          "tolerance": canary.DEFAULT_TOLERANCE}
    records = [LayerRecord(0, RecordKind.HEAD_TENSOR, 3, 7, 0, _float32(np.ones(21))),
               LayerRecord(1, RecordKind.HEAD_TENSOR, 3, 1, 0, _float32(np.zeros(3)))]
    data = encode_packet(PacketHeader(bundle.fingerprint, "wide", 1, meta), CodecHeader(seed=0),
                         records, key)
    rt = EdgeRuntime(str(minilm_bundle), [key.public_key()])

    def no_allocation(patches):
        raise AssertionError("the backend prepared buffers for a packet it must refuse")

    monkeypatch.setattr(rt.backend, "prepare", no_allocation)
    with pytest.raises(RuntimeApplyError, match=r"\[3, 7\].*384 features"):
        rt.stage(data)
    assert rt.cached == [] and rt.active is None


def test_a_dora_adapter_trained_on_another_base_is_one_clear_line(adapters, minilm_bundle,
                                                                  tmp_path, monkeypatch,
                                                                  capsys):
    """DoRA's magnitudes start at the base rows' norms: an adapter whose magnitudes are far from
    this bundle's weights (here: as if its base had weights twice as large) is refused before
    any packet is written, since the board would rescale this bundle's rows to them."""
    from safetensors.numpy import load_file, save_file

    from solar_edge.cli import main

    adir = tmp_path / "other-base"
    shutil.copytree(adapters["dora-bias"], adir)
    tensors = load_file(str(adir / "adapter_model.safetensors"))
    scaled = {k: (2 * v if "lora_magnitude_vector" in k else v) for k, v in tensors.items()}
    assert scaled.keys() == tensors.keys() and any("magnitude" in k for k in scaled)
    save_file(scaled, str(adir / "adapter_model.safetensors"))
    out = tmp_path / "never.slr"
    monkeypatch.setattr(sys, "argv", ["solar-edge", "compress", str(adir), "--bundle",
                                      str(minilm_bundle), "--budget", "30000", "--quiet",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code != 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: AdapterError:"), lines
    assert "trained on another base model" in lines[0] and not captured.out
    assert not out.exists()
    assert _compress_cli(adapters["dora-bias"], minilm_bundle, tmp_path / "ok.slr"
                         ).exit_code == 0  # the same adapter, unscaled, compresses


def test_dora_magnitudes_of_the_base_plus_a_large_update_are_this_base(minilm_bundle):
    """PEFT starts m at |W0 + dW|_row: with a LoRA initialised off zero (or trained far),
    that is far from |W0|_row and still this bundle's base; random norms are not."""
    from solar_edge.errors import AdapterError
    from solar_edge.exporters.adapter_checks import check_magnitudes
    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.base import LayerUpdate

    bundle = load_bundle(minilm_bundle)
    lid = 3
    w0 = np.asarray(bundle.base_weight(lid), np.float64)
    rng = np.random.default_rng(0)
    B = rng.standard_normal((w0.shape[0], 4)) * 0.5
    A = rng.standard_normal((4, w0.shape[1])) * 0.5
    m = np.sqrt(((w0 + B @ A) ** 2).sum(axis=1))
    base = np.sqrt((w0 ** 2).sum(axis=1))
    assert np.median(np.abs(m - base) / base) > 0.5  # the old check's tolerance: refused
    check_magnitudes({lid: m}, bundle, {lid: LayerUpdate("q", B, A)})
    with pytest.raises(AdapterError, match="another base model"):
        check_magnitudes({lid: m}, bundle)
    with pytest.raises(AdapterError, match="another base model"):
        check_magnitudes({lid: 3 * m}, bundle, {lid: LayerUpdate("q", B, A)})


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_regression_and_multi_label_heads_are_refused(adapters, minilm_bundle, tmp_path,
                                                      problem):
    """The board serves softmax classifiers and --max-drop measures argmax agreement: a
    regression or multi-label head would be served and measured as what it is not."""
    from solar_edge.exporters.compress import prepare_adapter
    from solar_edge.methods.peft_files import read_adapter

    adir = tmp_path / problem
    shutil.copytree(adapters["lora"], adir)
    config = json.loads((adir / "config.json").read_text())
    (adir / "config.json").write_text(json.dumps({**config, "problem_type": problem}))
    bundle = load_bundle(minilm_bundle)
    with pytest.raises(AdapterError, match="single-label classifiers only"):
        prepare_adapter(read_adapter(adir), bundle)
    prepare_adapter(read_adapter(adapters["lora"]), bundle)  # single-label: served
