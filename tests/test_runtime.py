"""EdgeRuntime on real MiniLM: every ORT patching mechanism against torch references.

The bundle is the export stage's ``minilm_bundle`` fixture (copied, then the runtime's graph
variants added).
Tolerances: ORT vs torch on unit-norm embeddings, float32: 1e-4 absolute.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from solar_edge.decode import decode_factors
from solar_edge.encode.solar import CodecConfig, encode
from solar_edge.errors import (
    BaseMismatchError,
    HealthCheckError,
    RollbackError,
    RuntimeApplyError,
    SignatureError,
    UnknownAdapterError,
)
from solar_edge.format import signing
from solar_edge.format.bundle import load_bundle
from solar_edge.format.packet import PacketHeader
from solar_edge.format.records import ValueFormat
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import LayerUpdate
from solar_edge.regen import update_digest
from solar_edge.regen.heads import task_head

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from solar_edge.runtime import patching  # noqa: E402
from solar_edge.runtime.backends import onnxruntime as backends_ort  # noqa: E402
from solar_edge.runtime.engine import EdgeRuntime  # noqa: E402

MECHANISMS = list(backends_ort.MECHANISMS)
SENTENCES = [
    "Return the absolute value of the argument.",
    "Open a file and return a stream.",
    "The quick brown fox jumps over the lazy dog.",
    "Edge boards receive signed adapter packets over slow links.",
]
TOL = 1e-4


# --- bundle and model fixtures ---------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_dir(minilm_variants_bundle) -> Path:
    return minilm_variants_bundle


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def key():
    return signing.generate_private_key()


@pytest.fixture(scope="module")
def hf_model(minilm_model_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_model_dir)).eval()


def random_updates(bundle, layer_ids, rank=4, scale=0.05, seed=0):
    rng = np.random.default_rng(seed)
    ups = {}
    for lid in layer_ids:
        layer = bundle.layers[lid]
        out_f, in_f = layer.shape
        ups[lid] = LayerUpdate(layer.name,
                               rng.standard_normal((out_f, rank)).astype(np.float32) * scale,
                               rng.standard_normal((rank, in_f)).astype(np.float32) * scale)
    return ups


def encode_updates(bundle, updates, *, fmt=ValueFormat.INT8, representation="factored_core",
                   epsilon=0.0):
    bases = {lid: bundle.layer_basis(lid) for lid in updates}
    return encode(updates, bases, CodecConfig(seed=11, epsilon=epsilon, value_format=fmt,
                                              representation=representation))


def make_packet(bundle, key, adapter_id, version, result, *, metadata=None, fingerprint=None):
    """A signed packet around an encoded result (encoding is the slow part: done once)."""
    header = PacketHeader(fingerprint or bundle.fingerprint, adapter_id, version,
                          metadata or {"task": adapter_id})
    return encode_packet(header, result.header, result.records, key)


@pytest.fixture(scope="module")
def encoded(bundle):
    """Codec results reused by the tests (the codec's fitting costs seconds per layer).

    ``a``: 6 weights, factored core in the SOLAR basis with eps > 0 (PRNG perturbations);
    ``mixed``: 3 weights, ``auto`` (whatever representation wins per layer);
    ``b``: 4 other weights, factored core; ``all``: all 36 weights as dense factors.
    """
    return {
        "a": encode_updates(bundle, random_updates(bundle, [0, 5, 9, 14, 20, 33], seed=1),
                            epsilon=0.01),
        "mixed": encode_updates(bundle, random_updates(bundle, [2, 17, 30], seed=2),
                                representation="auto"),
        "b": encode_updates(bundle, random_updates(bundle, [5, 21, 26, 35], seed=3)),
        "all": encode_updates(bundle, random_updates(bundle, range(36), seed=4),
                              representation="dense_factors"),
    }


def torch_embeddings(model, runtime, texts, deltas):
    """Unit-norm mean-pooled embeddings of ``model`` with ``{module: dW}`` merged."""
    feeds = runtime.family.feeds(texts)
    modules = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for name, dw in deltas.items():
                w = modules[name].weight
                saved[name] = w.detach().clone()
                w += torch.from_numpy(np.asarray(dw, np.float32))
            hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].weight.copy_(w)
    mask = feeds["attention_mask"][..., None].astype(np.float64)
    pooled = (hidden.numpy() * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def packet_deltas(bundle, result):
    """``{module: dW}`` from exactly what the packet carries (the codec's own decoder)."""
    out = {}
    for rec in result.records:
        left, right_t = decode_factors(rec, bundle.layer_basis(rec.layer_id), result.header)
        out[bundle.layers[rec.layer_id].name] = left @ right_t.T
    return out


# --- tests -------------------------------------------------------------------------------------

def test_the_exported_lora_graph_has_the_slots_the_runtime_feeds(bundle_dir, bundle):
    import onnx

    rel = bundle.manifest["onnx"]["variants"]["lora"]
    graph = onnx.load(str(bundle_dir / rel), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    for layer in bundle.layers:
        out = layer.shape[0]
        patch = patching.LayerPatch((np.zeros((out, 1)), np.zeros((layer.shape[1], 1))),
                                    bias=np.zeros(out), scale=np.ones(out))
        fed = patching.lora_feeds(layer.onnx_initializer, patch)
        assert len(fed) == 4 and set(fed) <= inputs, layer.name


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_apply_matches_torch_with_same_delta_merged(bundle_dir, bundle, key, hf_model, encoded,
                                                    mechanism):
    rt = EdgeRuntime(bundle_dir, [key.public_key()], mechanism=mechanism)
    base = rt.infer(SENTENCES)
    ref_base = torch_embeddings(hf_model, rt, SENTENCES, {})
    assert np.abs(base - ref_base).max() < TOL
    for name, version in (("a", 1), ("mixed", 2)):
        result = encoded[name]
        info = rt.apply(make_packet(bundle, key, "task", version, result))
        out = rt.infer(SENTENCES)
        ref = torch_embeddings(hf_model, rt, SENTENCES, packet_deltas(bundle, result))
        assert np.abs(out - ref).max() < TOL
        assert np.abs(out - base).max() > 100 * TOL  # the adapter changed something
        # the cache holds the factors only: 4 bytes * (out + in) * k per adapted weight
        ks = {r.layer_id: decode_factors(r, bundle.layer_basis(r.layer_id), result.header)[0]
              .shape[1] for r in result.records}
        expected = sum(4 * sum(bundle.layers[lid].shape) * k for lid, k in ks.items())
        assert info.cache_bytes == expected and info.layers == len(result.records)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_switch_and_reset_restore_exact_outputs(bundle_dir, bundle, key, encoded, mechanism):
    rt = EdgeRuntime(bundle_dir, [key.public_key()], mechanism=mechanism)
    base = rt.infer(SENTENCES)
    rt.apply(make_packet(bundle, key, "a", 1, encoded["a"]))
    out_a = rt.infer(SENTENCES)
    rt.apply(make_packet(bundle, key, "b", 1, encoded["b"]))  # overlaps a on weight 5
    out_b = rt.infer(SENTENCES)
    assert not np.array_equal(out_a, out_b)
    for _ in range(2):
        assert rt.switch("a").adapter_id == "a"
        assert np.array_equal(rt.infer(SENTENCES), out_a)
        rt.switch("b")
        assert np.array_equal(rt.infer(SENTENCES), out_b)
    rt.reset()
    assert rt.active is None
    assert np.array_equal(rt.infer(SENTENCES), base)
    with pytest.raises(UnknownAdapterError):
        rt.switch("nope")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_failure_mid_apply_keeps_previous_adapter(bundle_dir, bundle, key, encoded, monkeypatch,
                                                  mechanism):
    rt = EdgeRuntime(bundle_dir, [key.public_key()], mechanism=mechanism)
    rt.apply(make_packet(bundle, key, "a", 1, encoded["a"]))
    before = rt.infer(SENTENCES)
    # raise after half of the new adapter's 36 weights are staged
    target = "lora_feeds" if mechanism.startswith("lora") else "patched_weight_t"
    real = getattr(backends_ort, target)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 18:
            raise MemoryError("injected failure mid-apply")
        return real(*args, **kwargs)

    monkeypatch.setattr(backends_ort, target, flaky)
    pkt = make_packet(bundle, key, "b", 1, encoded["all"])
    with pytest.raises(RuntimeApplyError, match="injected"):
        rt.apply(pkt)
    monkeypatch.setattr(backends_ort, target, real)
    assert calls["n"] > 18
    assert rt.active.adapter_id == "a"
    assert np.array_equal(rt.infer(SENTENCES), before)
    assert "b" not in {c.adapter_id for c in rt.cached}
    rt.apply(pkt)  # and the same packet applies once the fault is gone
    assert rt.active.adapter_id == "b"


def test_failure_mid_commit_in_place_restores_previous(bundle_dir, bundle, key, encoded,
                                                       monkeypatch):
    """The in-place mechanism writes live buffers: a crash half-way through the copies."""
    rt = EdgeRuntime(bundle_dir, [key.public_key()], mechanism="initializer")
    rt.apply(make_packet(bundle, key, "a", 1, encoded["a"]))
    before = rt.infer(SENTENCES)
    mech = rt.backend

    class FailingHalfWay(dict):
        """The live buffers, failing on the 19th lookup (after 18 layers were written)."""

        lookups = 0

        def __getitem__(self, lid):
            FailingHalfWay.lookups += 1
            if FailingHalfWay.lookups == 19:
                raise OSError("injected failure after half the layers were patched")
            return super().__getitem__(lid)

    rt.stage(make_packet(bundle, key, "b", 1, encoded["all"]))  # verified and probed
    monkeypatch.setattr(mech, "live", FailingHalfWay(mech.live))
    with pytest.raises(RuntimeApplyError, match="half the layers"):
        rt.activate("b")
    assert FailingHalfWay.lookups > 19  # the commit failed, then the restore rewrote layers
    assert rt.active.adapter_id == "a"
    assert np.array_equal(rt.infer(SENTENCES), before)


@pytest.mark.parametrize("mechanism", ["initializer", "lora"])
def test_overflowing_update_is_rejected(bundle_dir, bundle, key, mechanism):
    rt = EdgeRuntime(bundle_dir, [key.public_key()], mechanism=mechanism)
    before = rt.infer(SENTENCES)
    huge = random_updates(bundle, [0, 1], rank=2, scale=3e19, seed=5)  # dW ~ 1e39: inf
    result = encode_updates(bundle, huge, fmt=ValueFormat.FLOAT32, representation="dense_factors")
    with pytest.raises(HealthCheckError, match="overflows"):
        rt.apply(make_packet(bundle, key, "bad", 1, result))
    assert rt.active is None
    assert np.array_equal(rt.infer(SENTENCES), before)


def honest_vouch(bundle_dir, key, packet: bytes) -> dict:
    """Metadata vouching for ``packet``'s update: the digest a board computes from it."""
    rt = EdgeRuntime(bundle_dir, [key.public_key()])
    info = rt.stage(packet)
    return {"task": info.adapter_id, "update_digest": {
        "digest": rt.update_digest(info.adapter_id),
        "tolerance": update_digest.DEFAULT_TOLERANCE}}


@pytest.mark.parametrize("vouch", [False, True])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_non_finite_outputs_fail_the_health_check(bundle_dir, bundle, key, encoded, monkeypatch,
                                                  mechanism, vouch):
    """A fault that corrupts a staged weight (NaN) is caught by the output check, or, for a
    packet with an update digest on the slot mechanism, by the digest of the staged feeds."""
    rt = EdgeRuntime(bundle_dir, [key.public_key()], mechanism=mechanism)
    rt.apply(make_packet(bundle, key, "a", 1, encoded["a"]))
    before = rt.infer(SENTENCES)
    meta = honest_vouch(bundle_dir, key, make_packet(bundle, key, "b", 1, encoded["b"])) \
        if vouch else None
    target = "lora_feeds" if mechanism.startswith("lora") else "patched_weight_t"
    real = getattr(backends_ort, target)

    armed = {"once": True}  # a transient fault: the restore that follows computes cleanly

    def corrupting(*args, **kwargs):
        out = real(*args, **kwargs)
        if armed.pop("once", False):
            for arr in (out.values() if isinstance(out, dict) else [out]):
                arr.reshape(-1)[:1] = np.nan
        return out

    monkeypatch.setattr(backends_ort, target, corrupting)
    with pytest.raises(HealthCheckError, match="non-finite|not finite"):
        rt.apply(make_packet(bundle, key, "b", 1, encoded["b"], metadata=meta))
    monkeypatch.setattr(backends_ort, target, real)
    assert rt.active.adapter_id == "a"
    assert np.array_equal(rt.infer(SENTENCES), before)


@pytest.mark.parametrize("vouch", [False, True])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_finite_factors_that_overflow_in_the_forward_pass_fail_the_probe(bundle_dir, bundle, key,
                                                                         encoded, mechanism,
                                                                         vouch):
    """Why the forward probe stays: a rank-1 update of 1e19 x 1e19 passes every check on
    its factors (finite; the overflow bound 1e38 is below float32's max / 2, and ``dW``
    itself is finite), but the layer's output overflows on real hidden states. An honest
    update digest does not spare it the probe (it is far outside ``within_growth``); the
    packet is refused and the old adapter serves."""
    out_f, in_f = bundle.layers[0].shape
    c = np.float32(1e19)
    huge = {0: LayerUpdate(bundle.layers[0].name, np.full((out_f, 1), c, np.float32),
                           np.full((1, in_f), c, np.float32))}
    result = encode_updates(bundle, huge, fmt=ValueFormat.FLOAT32, representation="dense_factors")
    factors = decode_factors(result.records[0], None, result.header)
    left, right_t = patching.check_factors(0, (out_f, in_f), factors)  # no error: all finite
    assert np.isfinite(left @ right_t.T).all()
    meta = None
    if vouch:
        digest = update_digest.digest([update_digest.LayerUpdate(0, (left, right_t), None, None)],
                                      None)
        meta = {"task": "bad", "update_digest": {"digest": digest, "tolerance": 1e-3}}
    rt = EdgeRuntime(bundle_dir, [key.public_key()], mechanism=mechanism)
    rt.apply(make_packet(bundle, key, "a", 1, encoded["a"]))
    before = rt.infer(SENTENCES)
    with pytest.raises(HealthCheckError, match="non-finite outputs"):
        rt.apply(make_packet(bundle, key, "bad", 1, result, metadata=meta))
    assert rt.active.adapter_id == "a"
    assert np.array_equal(rt.infer(SENTENCES), before)


def test_rejections_signature_base_rollback(bundle_dir, bundle, key, encoded):
    rt = EdgeRuntime(bundle_dir, [key.public_key()])
    res = encoded["b"]
    v2 = make_packet(bundle, key, "task", 2, res)
    rt.apply(v2)
    serving = rt.infer(SENTENCES)
    untrusted = make_packet(bundle, signing.generate_private_key(), "task", 3, res)
    tampered = bytearray(make_packet(bundle, key, "task", 3, res))
    tampered[-80] ^= 0x01  # a body byte: the signature no longer covers it
    wrong_base = make_packet(bundle, key, "task", 3, res, fingerprint=b"\x11" * 32)
    v1 = make_packet(bundle, key, "task", 1, res)
    for data, error in [(untrusted, SignatureError), (bytes(tampered), SignatureError),
                        (wrong_base, BaseMismatchError), (v1, RollbackError), (v2, RollbackError)]:
        with pytest.raises(error):
            rt.apply(data)
        assert rt.active.version == 2
        assert np.array_equal(rt.infer(SENTENCES), serving)
    assert rt.installed_versions == {"task": 2}
    # a restarted runtime told what is installed accepts that version again, not older ones
    fresh = EdgeRuntime(bundle_dir, [key.public_key()], min_versions={"task": 2})
    with pytest.raises(RollbackError):
        fresh.apply(v1)
    fresh.apply(v2)
    assert np.array_equal(fresh.infer(SENTENCES), serving)


def test_task_head_from_metadata(bundle_dir, bundle, key, encoded, hf_model):
    """Logits against the head's formula written out here, on torch's hidden states."""
    rt = EdgeRuntime(bundle_dir, [key.public_key()])
    labels = ["builtins", "io", "text"]
    meta = {"task": "demo", "labels": labels, "head_seed": 1234}
    result = encoded["b"]
    rt.apply(make_packet(bundle, key, "cls", 1, result, metadata=meta))
    logits = rt.infer(SENTENCES)
    assert logits.shape == (len(SENTENCES), 3)
    unit = torch_embeddings(hf_model, rt, SENTENCES, packet_deltas(bundle, result))
    signs = np.sign(task_head(1234, 3, unit.shape[1]))  # the head is +-1 / sqrt(hidden)
    expected = 20.0 * unit @ (signs / np.sqrt(unit.shape[1])).T
    assert np.allclose(logits, expected, atol=1e-3)
    assert rt.classify(SENTENCES) == [labels[i] for i in expected.argmax(-1)]


def test_lossless_packet_equals_peft_merge_and_unload(bundle_dir, bundle, key, hf_model,
                                                      lora_adapter_dir):
    """FLOAT32 values, full-rank basis, eps=0: the runtime serves PEFT's merged model."""
    from peft import PeftModel

    from solar_edge.methods.matching import match_to_bundle
    from solar_edge.methods.peft_files import read_adapter

    adapter = read_adapter(lora_adapter_dir)
    updates = match_to_bundle(adapter.updates, bundle.manifest["layers"])
    assert all(bundle.layers[lid].rank == min(bundle.layers[lid].shape) for lid in updates)
    result = encode_updates(bundle, updates, fmt=ValueFormat.FLOAT32, epsilon=0.0)
    rt = EdgeRuntime(bundle_dir, [key.public_key()])
    rt.apply(make_packet(bundle, key, "lora", 1, result))
    out = rt.infer(SENTENCES)
    merged = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(lora_adapter_dir))
    merged = merged.merge_and_unload().eval()
    ref = torch_embeddings(merged, rt, SENTENCES, {})
    assert np.abs(out - ref).max() < TOL
    assert np.abs(out - torch_embeddings(hf_model, rt, SENTENCES, {})).max() > 10 * TOL


def test_vera_packet_serves_peft_merged_model(bundle_dir, bundle, key, hf_model,
                                              vera_adapter_dir):
    """VERA_SCALES records: the device regenerates PEFT's projections from the key alone."""
    from peft import PeftModel

    from solar_edge.format.packet import PacketHeader
    from solar_edge.format.records import CodecHeader
    from solar_edge.format.writer import encode_packet
    from solar_edge.methods.matching import match_to_bundle
    from solar_edge.methods.peft_files import read_adapter
    from solar_edge.methods.vera import carry

    adapter = read_adapter(vera_adapter_dir)
    updates = match_to_bundle(adapter.updates, bundle.manifest["layers"])
    records = carry(adapter, updates, None)
    pkt = encode_packet(PacketHeader(bundle.fingerprint, "vera", 1, {}), CodecHeader(seed=0),
                        records, key)
    rt = EdgeRuntime(bundle_dir, [key.public_key()])
    info = rt.apply(pkt)
    out = rt.infer(SENTENCES)
    merged = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(vera_adapter_dir))
    ref = torch_embeddings(merged.merge_and_unload().eval(), rt, SENTENCES, {})
    assert info.layers == 12 and np.abs(out - ref).max() < TOL
    assert np.abs(out - torch_embeddings(hf_model, rt, SENTENCES, {})).max() > 10 * TOL


def test_cli_run_prints_label_of_task_head(bundle_dir, bundle, key, encoded, tmp_path):
    from click.testing import CliRunner

    from solar_edge.cli import cli

    labels = ["builtins", "io", "text"]
    pkt = make_packet(bundle, key, "cls", 1, encoded["b"],
                      metadata={"task": "demo", "labels": labels, "head_seed": 99})
    (tmp_path / "a.slr").write_bytes(pkt)
    pub = signing.save_public_key(key, tmp_path / "k.pub")
    args = ["run", str(tmp_path / "a.slr"), "--bundle", str(bundle_dir),
            "--trusted-key", str(pub), "--text", SENTENCES[0], "--text", SENTENCES[1]]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    old = CliRunner().invoke(cli, ["run", "--bundle", str(bundle_dir), "--packet",
                                   str(tmp_path / "a.slr"), "--key", str(pub), "--json",
                                   "--text", SENTENCES[0], "--text", SENTENCES[1]])
    assert old.exit_code == 0 and json.loads(old.output)["answers"] == out["answers"]
    rt = EdgeRuntime(bundle_dir, [key.public_key()])
    rt.apply(pkt)
    assert [a["label"] for a in out["answers"]] == rt.classify(SENTENCES[:2])
    assert out["applied"][0]["adapter_id"] == "cls"
    plain = CliRunner().invoke(cli, ["run", "--bundle", str(bundle_dir), "--text", "hi"])
    assert plain.exit_code == 0 and "embedding[384] norm=1.0000" in plain.output
    unsigned = CliRunner().invoke(cli, ["run", str(tmp_path / "a.slr"), "--bundle",
                                        str(bundle_dir), "--text", "hi"])
    assert unsigned.exit_code != 0 and "--trusted-key" in unsigned.output
