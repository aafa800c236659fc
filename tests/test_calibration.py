"""Calibration statistics on the real MiniLM bundle, checked against computations written here.

* ``calibration_grams``: a layer's input Gram equals the Gram of the hidden states that
  transformers returns for that layer's input (``output_hidden_states``), padding excluded;
* ``calibration_fisher`` (the adapter applied by hooks): the output-side K-FAC factor equals
  the gradient second moment computed here with the adapter merged into the weights and
  ``retain_grad`` on the layer's output; without labels it uses labels
  drawn from the adapter's own predictions (deterministic for a seed);
* ``solar-edge compress --metric act|fisher --calib-data FILE`` end to end, and its refusals
  of bad calibration files: one line, exit code 1, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from solar_edge.cli import cli  # noqa: E402
from solar_edge.exporters.calibration import calibration_fisher, calibration_grams  # noqa: E402
from solar_edge.exporters.families import open_bundle_model  # noqa: E402
from solar_edge.exporters.heads import head_for  # noqa: E402
from solar_edge.exporters.patches import adapter_patches  # noqa: E402
from solar_edge.format.bundle import load_bundle  # noqa: E402
from solar_edge.methods.matching import match_to_bundle  # noqa: E402
from solar_edge.methods.peft_files import read_adapter  # noqa: E402

TEXTS = [
    "Return the absolute value of the argument.",
    "Open a file and return a corresponding file object.",
    "Split the string at the first occurrence of sep.",
    "Create a new socket using the given address family.",
    "Decode the JSON document into a Python object.",
    "Start the thread's activity.",
    "Return the square root of x.",
    "Compress data with zlib and return the bytes.",
    "Format the value according to the format specification.",
    "Remove the file path; raise if it is a directory.",
]


@pytest.fixture(scope="module")
def world(minilm_bundle: Path, lora_adapter_dir: Path):
    bundle = load_bundle(minilm_bundle)
    adapter = read_adapter(lora_adapter_dir)
    updates = match_to_bundle(adapter.updates, bundle.layers)
    model = open_bundle_model(bundle)
    return bundle, adapter, updates, model


def _lid(bundle, name: str) -> int:
    return next(layer.id for layer in bundle.layers if layer.name == name)


def test_input_gram_equals_the_hidden_state_gram(world):
    bundle, _, _, model = world
    lid = _lid(bundle, "encoder.layer.2.attention.self.query")
    got = calibration_grams(model, bundle, TEXTS, [lid], batch=4)[lid]
    enc = model.tokenizer(TEXTS, truncation=True, max_length=64, padding=True,
                          return_tensors="pt")
    with torch.no_grad():
        hidden = model.module(**enc, output_hidden_states=True).hidden_states[2]
    x = hidden[enc["attention_mask"].bool()].double().numpy()
    want = x.T @ x / x.shape[0]
    assert got.shape == (384, 384)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8 * np.abs(want).max())


def _gradient_moment(model, bundle, texts, labels, dense, head, name):
    """Sum over real tokens of g g^T / texts, g = d(summed CE)/d(layer output): by hand."""
    modules = dict(model.module.named_modules())
    total = None
    with torch.no_grad():
        for lid, dw in dense.items():
            modules[bundle.layer(lid).name].weight += torch.from_numpy(dw.astype(np.float32))
    try:
        enc = model.tokenizer(texts, truncation=True, max_length=64, padding=True,
                              return_tensors="pt")
        captured = {}
        handle = modules[name].register_forward_hook(
            lambda mod, args, out: captured.setdefault("out", out))
        try:
            hidden, mask = model.hidden({k: enc[k] for k in ("input_ids", "attention_mask")})
        finally:
            handle.remove()
        captured["out"].retain_grad()
        loss = torch.nn.functional.cross_entropy(head(hidden, mask), torch.tensor(labels),
                                                 reduction="sum")
        loss.backward()
        g = captured["out"].grad[enc["attention_mask"].bool()].double().numpy()
        total = g.T @ g / len(texts)
    finally:
        with torch.no_grad():
            for lid, dw in dense.items():
                modules[bundle.layer(lid).name].weight -= torch.from_numpy(dw.astype(np.float32))
        model.module.zero_grad(set_to_none=True)
    return total


def test_output_factor_equals_the_gradient_moment(world):
    bundle, adapter, updates, model = world
    head = head_for(adapter.task_meta, model.hidden_size)
    dense = {lid: u.B @ u.A for lid, u in updates.items()}
    labels = [i % len(adapter.task_meta["labels"]) for i in range(len(TEXTS))]
    name = bundle.layer(max(updates)).name
    patches = adapter_patches(bundle, updates)
    _, gamma = calibration_fisher(model, bundle, TEXTS, labels, patches, head, batch=len(TEXTS))
    want = _gradient_moment(model, bundle, TEXTS, labels, dense, head, name)
    got = gamma[max(updates)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_unlabelled_fisher_uses_the_adapters_own_predictions(world):
    bundle, adapter, updates, model = world
    head = head_for(adapter.task_meta, model.hidden_size)
    patches = adapter_patches(bundle, updates)
    g1, gamma1 = calibration_fisher(model, bundle, TEXTS, None, patches, head, seed=3)
    _, gamma2 = calibration_fisher(model, bundle, TEXTS, None, patches, head, seed=3)
    lid = max(updates)  # a late layer: the adapter's earlier layers change its inputs
    assert np.array_equal(gamma1[lid], gamma2[lid])
    eig = np.linalg.eigvalsh(gamma1[lid])
    assert eig.max() > 0 and eig.min() > -1e-9 * eig.max()  # a non-zero PSD factor
    grams = calibration_grams(model, bundle, TEXTS, [lid])  # the base model's inputs
    assert not np.allclose(g1[lid], grams[lid])  # fisher's G is at the adapted model


def _compress(args: list[str]):
    return CliRunner().invoke(cli, ["compress", *args])


@pytest.mark.parametrize(("metric", "kind"), [("act", "txt"), ("fisher", "jsonl"),
                                              ("fisher", "txt")])
def test_compress_with_a_calibration_file(minilm_bundle, lora_adapter_dir, tmp_path, metric,
                                          kind):
    labels = json.loads((lora_adapter_dir / "task.json").read_text())["labels"]
    data = tmp_path / f"calib.{kind}"
    if kind == "txt":
        data.write_text("\n".join(TEXTS) + "\n")
    else:
        data.write_text("".join(json.dumps({"text": t, "label": labels[i % len(labels)]}) + "\n"
                                for i, t in enumerate(TEXTS)))
    out = tmp_path / "p.slr"
    result = _compress([str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--budget",
                        "3000", "--metric", metric, "--calib-data", str(data), "--refit", "0",
                        "--json", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["calibration"] == str(data) and info["bytes"] == len(out.read_bytes()) <= 3000
    assert any(row["kind"] != "dropped" for row in info["layer_table"])


@pytest.mark.parametrize(("content", "suffix", "message"), [
    (b"", ".txt", "no texts"),
    (b"\x00\x01\x02binary", ".txt", "binary"),
    (b"\xff\xfe not utf-8", ".txt", "not UTF-8"),
    (b'{"label": "text"}\n', ".jsonl", '"text" string'),
    (b'{"text": "a", "label": "no-such-label"}\n', ".jsonl", "not one of the adapter's labels"),
    (b'{"text": "a", "label": 99}\n', ".jsonl", "outside the adapter's"),
    (b'{"text": "a", "label": "text"}\n{"text": "b"}\n', ".jsonl", "label all of them"),
    (b"one\ntwo\nthree\n", ".txt", "at least 8"),
    (b"a,b\n", ".csv", ".txt or .jsonl"),
])
def test_bad_calibration_files_are_one_clear_line(minilm_bundle, lora_adapter_dir, tmp_path,
                                                  content, suffix, message):
    data = tmp_path / f"bad{suffix}"
    data.write_bytes(content)
    out = tmp_path / "never.slr"
    result = _compress([str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--budget",
                        "3000", "--metric", "act", "--calib-data", str(data), "--out",
                        str(out)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()
