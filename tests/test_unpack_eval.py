"""``solar-edge unpack`` and ``solar-edge eval`` on the real MiniLM bundle.

Unpacked adapters must load into PEFT with exactly the keys PEFT itself would save, and serve
the runtime's outputs for the same packet: SEQ_CLS LoRA, DoRA with trained biases and mixed
ranks (``rank_pattern``), a layer whose factors were dropped (rank-1 zeros), the project's
seeded head (``task.json``) and VeRA (embeddings). ``eval`` compares a packet on the board
runtime with its adapter in torch; bad inputs end as one ``error: Type: message`` line.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402
from seqcls_adapter import LABELS, make_seqcls_adapter  # noqa: E402

from solar_edge.cli import cli, main  # noqa: E402
from solar_edge.format import signing  # noqa: E402
from solar_edge.format.reader import decode_packet  # noqa: E402
from solar_edge.format.records import RecordKind  # noqa: E402
from solar_edge.format.writer import encode_packet  # noqa: E402

TEXTS = ["Return the absolute value of the argument.", "Open a file and return a stream.",
         "Split the string at the first occurrence of sep.", "Join the words with commas."]


_make = make_seqcls_adapter


@pytest.fixture(scope="module")
def seqcls(tmp_path_factory, minilm_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unpack-seqcls")
    return {"lora": _make(root / "lora", minilm_model_dir),
            "dora": _make(root / "dora", minilm_model_dir, use_dora=True, bias="lora_only")}


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _compress(adapter: Path, bundle: Path, out: Path, budget: int = 20000) -> Path:
    _ok(["compress", str(adapter), "--bundle", str(bundle), "--budget", str(budget),
         "--out", str(out), "--quiet", "--json"])
    return out


def _unpack(packet: Path, bundle: Path, out: Path) -> dict:
    return json.loads(_ok(["unpack", str(packet), "--bundle", str(bundle), "--out", str(out),
                           "--trusted-key", f"{packet}.pub", "--json"]))


def _load(adapter_dir: Path, model_dir: Path, seq_cls: bool):
    """PeftModel of the unpacked adapter; what it holds is exactly what was written."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    from solar_edge.exporters.families.text_encoder import quiet_loading

    with quiet_loading():
        base = (AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=3)
                if seq_cls else AutoModel.from_pretrained(str(model_dir)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    written = load_file(str(adapter_dir / "adapter_model.safetensors"))
    held = get_peft_model_state_dict(model)
    assert set(held) == set(written)  # nothing missing, nothing unexpected
    for key, value in written.items():
        np.testing.assert_array_equal(held[key].numpy(), value, err_msg=key)
    return model


def _torch_out(model, model_dir: Path, seq_cls: bool, task: dict | None = None) -> np.ndarray:
    from transformers import AutoTokenizer

    from solar_edge.exporters.families.base import mean_pooled, unit
    from solar_edge.exporters.heads import head_for

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
        if seq_cls:
            return out.logits.numpy()
        hidden, mask = out.last_hidden_state, enc["attention_mask"]
        head = head_for(task or {}, hidden.shape[-1])
        return (head(hidden, mask) if head else unit(mean_pooled(hidden, mask))).numpy()


def _board(bundle: Path, data: bytes, key) -> np.ndarray:
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(bundle), [key])
    rt.apply(data)
    return rt.infer(TEXTS)


def _pub(packet: Path):
    return signing.load_public_key(f"{packet}.pub")


def test_unpacked_seqcls_lora_serves_the_runtime_logits(seqcls, minilm_bundle, minilm_model_dir,
                                                        tmp_path):
    packet = _compress(seqcls["lora"], minilm_bundle, tmp_path / "p.slr")
    info = _unpack(packet, minilm_bundle, tmp_path / "u")
    assert info["task_type"] == "SEQ_CLS" and not info["dora"] and info["signature"] == "verified"
    assert info["head"] == ["classifier.bias", "classifier.weight"]
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert config["id2label"] == {"0": "numeric", "1": "files", "2": "text"}
    model = _load(tmp_path / "u", minilm_model_dir, seq_cls=True)
    want = _board(minilm_bundle, packet.read_bytes(), _pub(packet))
    np.testing.assert_allclose(_torch_out(model, minilm_model_dir, True), want, atol=1e-3)


def test_lora_bias_adapter_serves_peft_logits_and_unpacks(minilm_bundle, minilm_model_dir,
                                                          tmp_path):
    """PEFT's ``lora_bias=True`` (a bias on lora_B, scaled like the factors) over
    ``bias="lora_only"``: the board adds both to the layer's bias, as PEFT's merge does. An
    exact packet carries head and biases as float32 too."""
    from seqcls_adapter import save_adapter, seqcls_peft_model

    pm, model = seqcls_peft_model(minilm_model_dir, lora_bias=True, bias="lora_only",
                                  noise=0.2)
    adapter = save_adapter(pm, model, tmp_path / "a")
    pm.eval()
    want = _torch_out(pm, minilm_model_dir, True)
    packet = tmp_path / "p.slr"
    _ok(["compress", str(adapter), "--bundle", str(minilm_bundle), "--exact", "--out",
         str(packet), "--quiet", "--json"])
    served = _board(minilm_bundle, packet.read_bytes(), _pub(packet))
    np.testing.assert_allclose(served, want, atol=1e-4)
    extras = [r for r in decode_packet(packet.read_bytes()).records
              if r.kind in (RecordKind.HEAD_TENSOR, RecordKind.BIAS_DELTA)]
    assert len(extras) == 2 + 12 and all(r.values.fmt.name == "FLOAT32" for r in extras)
    with torch.no_grad():  # without the lora_B biases the logits move: the test can tell
        for name, p in pm.named_parameters():
            if name.endswith("lora_B.default.bias"):
                p.zero_()
    assert np.abs(_torch_out(pm, minilm_model_dir, True) - want).max() > 0.1
    _unpack(packet, minilm_bundle, tmp_path / "u")
    unpacked = _load(tmp_path / "u", minilm_model_dir, seq_cls=True)
    np.testing.assert_allclose(_torch_out(unpacked, minilm_model_dir, True), served, atol=1e-4)


def test_unpacked_dora_with_biases_mixed_ranks_and_a_dropped_layer(seqcls, minilm_bundle,
                                                                   minilm_model_dir, tmp_path):
    packet = _compress(seqcls["dora"], minilm_bundle, tmp_path / "p.slr")
    info = _unpack(packet, minilm_bundle, tmp_path / "u")
    assert info["dora"] and len(info["biases"]) == 12
    config = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["bias"] == "lora_only" and config["rank_pattern"]
    assert len(set(info["ranks"].values())) > 1  # rank_pattern/alpha_pattern in use
    model = _load(tmp_path / "u", minilm_model_dir, seq_cls=True)
    want = _board(minilm_bundle, packet.read_bytes(), _pub(packet))
    np.testing.assert_allclose(_torch_out(model, minilm_model_dir, True), want, atol=1e-3)

    # eval warns when the packet changes what the adapter does not train: not its adapter
    from solar_edge.exporters.eval_cmd import mismatch_warnings
    from solar_edge.exporters.unpack import read_packet
    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.peft_files import read_adapter

    bundle = load_bundle(minilm_bundle)
    read = read_packet(packet.read_bytes(), bundle, None)
    assert mismatch_warnings(read, read_adapter(seqcls["dora"]), bundle) == []
    found = mismatch_warnings(read, read_adapter(seqcls["lora"]), bundle)
    assert [w.split(" of ")[0] for w in found] == ["the packet changes biases",
                                                   "the packet changes magnitudes"], found
    assert "12 layer(s)" in found[0]

    # drop one layer's factors: its bias and magnitude stay, on rank-1 zero factors
    pkt = decode_packet(packet.read_bytes())
    factor_kinds = (RecordKind.DENSE_FACTORS, RecordKind.FACTORED_CORE)
    dropped = next(r.layer_id for r in pkt.records if r.kind in factor_kinds)
    records = [r for r in pkt.records if not (r.layer_id == dropped and r.kind in factor_kinds)]
    key = signing.generate_private_key()
    # the packet no longer is what its update digest says, so it carries none
    assert "update_digest" in pkt.header.metadata
    header = replace(pkt.header, metadata={k: v for k, v in pkt.header.metadata.items()
                                           if k not in ("canary", "update_digest")})
    data = encode_packet(header, pkt.codec, records, key)
    (tmp_path / "q.slr").write_bytes(data)
    signing.save_public_key(key, tmp_path / "q.slr.pub")
    info = _unpack(tmp_path / "q.slr", minilm_bundle, tmp_path / "v")
    from solar_edge.format.bundle import load_bundle

    assert info["ranks"][load_bundle(minilm_bundle).layer(dropped).name] == 1
    model = _load(tmp_path / "v", minilm_model_dir, seq_cls=True)
    np.testing.assert_allclose(_torch_out(model, minilm_model_dir, True),
                               _board(minilm_bundle, data, key.public_key()), atol=1e-3)


def test_unpacked_seeded_head_adapter_loads_into_automodel(lora_adapter_dir, minilm_bundle,
                                                           minilm_model_dir, tmp_path):
    packet = _compress(lora_adapter_dir, minilm_bundle, tmp_path / "p.slr")
    info = _unpack(packet, minilm_bundle, tmp_path / "u")
    assert info["task_type"] == "FEATURE_EXTRACTION" and info["head"] == []
    task = json.loads((tmp_path / "u" / "task.json").read_text())
    source = json.loads((lora_adapter_dir / "task.json").read_text())
    assert task["labels"] == source["labels"] and task["head_seed"] == source["head_seed"]
    model = _load(tmp_path / "u", minilm_model_dir, seq_cls=False)
    got = _torch_out(model, minilm_model_dir, False, task)
    want = _board(minilm_bundle, packet.read_bytes(), _pub(packet))
    assert got.shape == want.shape == (len(TEXTS), len(task["labels"]))
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_unpacked_vera_packet_serves_the_runtime_embeddings(vera_adapter_dir, minilm_bundle,
                                                            minilm_model_dir, tmp_path):
    packet = tmp_path / "v.slr"
    _ok(["compress", str(vera_adapter_dir), "--bundle", str(minilm_bundle), "--exact",
         "--out", str(packet), "--quiet", "--json"])
    info = _unpack(packet, minilm_bundle, tmp_path / "u")
    assert info["task_type"] == "FEATURE_EXTRACTION" and not (tmp_path / "u/task.json").exists()
    model = _load(tmp_path / "u", minilm_model_dir, seq_cls=False)
    want = _board(minilm_bundle, packet.read_bytes(), _pub(packet))
    np.testing.assert_allclose(_torch_out(model, minilm_model_dir, False), want, atol=1e-4)


def _jsonl(path: Path) -> Path:
    rows = [(t, LABELS[i % 3]) for i, t in enumerate(TEXTS * 3)]
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def test_eval_reports_agreement_and_accuracy(seqcls, lora_adapter_dir, minilm_bundle, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl")
    packet = _compress(seqcls["lora"], minilm_bundle, tmp_path / "big.slr", budget=200000)
    report = json.loads(_ok(["eval", str(seqcls["lora"]), str(packet), "--bundle",
                             str(minilm_bundle), "--data", str(data), "--trusted-key",
                             f"{packet}.pub", "--json"]))
    assert report["n"] == 12 and report["outputs"] == "logits"
    assert report["agreement"] >= 90 and set(report["accuracy"]) == {"board", "torch"}
    assert report["mean_cosine"] > 0.9 and report["signature"] == "verified"
    assert report["warnings"] == []

    # the same adapter saved without task_type: still a classifier, in eval as in compress
    shutil.copytree(seqcls["lora"], tmp_path / "no-task")
    config = json.loads((tmp_path / "no-task/adapter_config.json").read_text())
    (tmp_path / "no-task/adapter_config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k != "task_type"}))
    again = json.loads(_ok(["eval", str(tmp_path / "no-task"), str(packet), "--bundle",
                            str(minilm_bundle), "--data", str(data), "--json"]))
    assert again["outputs"] == "logits" and again["agreement"] == report["agreement"]

    # the seeded head's adapter against its own unpacked packet: the same model, unverified
    seeded = _compress(lora_adapter_dir, minilm_bundle, tmp_path / "s.slr")
    _unpack(seeded, minilm_bundle, tmp_path / "u")
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    text = _ok(["eval", str(tmp_path / "u"), str(seeded), "--bundle", str(minilm_bundle),
                "--data", str(tmp_path / "t.txt")])
    assert "prediction agreement: 100.00%" in text and "not checked" in text
    diff = float(text.split("max abs logit difference:")[1].split()[0])
    assert diff < 1e-3


def _fails(monkeypatch, capsys, args: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["solar-edge", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_end_as_one_clear_line(seqcls, minilm_bundle, tiny_bundle, tmp_path,
                                          monkeypatch, capsys):
    packet = _compress(seqcls["lora"], minilm_bundle, tmp_path / "p.slr")
    data = _jsonl(tmp_path / "d.jsonl")
    line = _fails(monkeypatch, capsys, ["unpack", str(packet), "--bundle", str(tiny_bundle),
                                        "--out", str(tmp_path / "u")])
    assert line.startswith("error: BaseMismatchError:") and "not this bundle" in line
    line = _fails(monkeypatch, capsys, ["eval", str(seqcls["lora"]), str(packet), "--bundle",
                                        str(tiny_bundle), "--data", str(data)])
    assert line.startswith("error: BaseMismatchError:")
    (tmp_path / "empty").mkdir()
    line = _fails(monkeypatch, capsys, ["eval", str(tmp_path / "empty"), str(packet),
                                        "--bundle", str(minilm_bundle), "--data", str(data)])
    assert line.startswith("error: AdapterError:") and "adapter_config.json" in line
    (tmp_path / "none.txt").write_text("\n  \n")
    line = _fails(monkeypatch, capsys, ["eval", str(seqcls["lora"]), str(packet), "--bundle",
                                        str(minilm_bundle), "--data", str(tmp_path / "none.txt")])
    assert line.startswith("error: CalibrationError:") and "no texts" in line
    other = signing.save_public_key(signing.generate_private_key(), tmp_path / "other.pub")
    line = _fails(monkeypatch, capsys, ["eval", str(seqcls["lora"]), str(packet), "--bundle",
                                        str(minilm_bundle), "--data", str(data),
                                        "--trusted-key", str(other)])
    assert line.startswith("error: SignatureError:")
    # a multi-label adapter: eval refuses it as compress does (the board serves a softmax)
    shutil.copytree(seqcls["lora"], tmp_path / "multi")
    config = tmp_path / "multi/config.json"
    config.write_text(json.dumps({**(json.loads(config.read_text()) if config.exists() else {}),
                                  "problem_type": "multi_label_classification"}))
    line = _fails(monkeypatch, capsys, ["eval", str(tmp_path / "multi"), str(packet),
                                        "--bundle", str(minilm_bundle), "--data", str(data)])
    assert line.startswith("error: AdapterError:") and "multi-label" in line
