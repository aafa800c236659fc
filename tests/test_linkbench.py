"""linkbench through the real throttled server: measured agrees with the model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from solar_edge.devices.artifact_info import model_parts, safetensors_dtypes
from solar_edge.devices.cli import linkbench
from solar_edge.devices.linkbench import prefix_for, run_linkbench
from solar_edge.errors import AdapterError, BundleError, ProfileError
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
from solar_edge.profiles.links import LinkProfile, get_link


def test_measured_times_follow_the_link_model(tmp_path):
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(os.urandom(3_000))
    big.write_bytes(os.urandom(400_000))
    link = LinkProfile("t", "tcp", rate_bps=2_000_000, latency_s=0.02, loss=0.0, mtu=1500)
    rows = run_linkbench({"small": small, "big": big}, [link, get_link("lorawan")], budget_s=0.6)
    by = {(r.link, r.artifact): r for r in rows}
    assert by[("t", "small")].method == "measured"
    assert by[("t", "big")].method.endswith("prefix, extrapolated")
    for key in (("t", "small"), ("t", "big")):
        r = by[key]
        assert 0.8 * r.computed_s < r.measured_s < 1.5 * r.computed_s, r
    lora = by[("lorawan", "big")]
    assert lora.measured_s is None and lora.computed_s > 3600   # hours on LoRaWAN


def test_prefix_is_none_when_the_whole_file_fits():
    link = get_link("wifi")
    assert prefix_for(10_000, link, 1.0) is None
    sat = get_link("satellite")
    prefix = prefix_for(10_000_000, sat, 2.0)
    assert prefix is not None and prefix >= 4 * sat.mss


def _bundle(folder):
    """A small real bundle: an ONNX graph with fp32 external data, an fp16 layer weight file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir()
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64))
                                .astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [w])
    onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"),
                    save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    (folder / "weights").mkdir()
    np.save(folder / "weights" / "0000.npy", np.ones((32, 32), np.float16))
    (folder / "manifest.json").write_text(json.dumps({
        "onnx": {"file": "model.onnx"}, "layers": [{"files": {"weight": "weights/0000.npy"}}]}))
    return folder


def _packet(path):
    records = [LayerRecord(0, RecordKind.BIAS_DELTA, 50, 1, 0,
                           QuantizedValues(ValueFormat.FLOAT16, 50, raw=np.ones(50, np.float16)))]
    path.write_bytes(encode_packet(PacketHeader(bytes(32), "a", 1, {}), CodecHeader(0), records,
                                   signing.generate_private_key()))
    return path


def test_cli_counts_the_whole_bundle_and_reads_real_dtypes(tmp_path):
    bundle = _bundle(tmp_path / "bundle")
    lora = tmp_path / "adapter_model.safetensors"
    save_file({"a": np.zeros((8, 384), np.float32), "b": np.zeros((384, 8), np.float32)}, lora)
    packet = _packet(tmp_path / "p.slr")
    out = tmp_path / "out"
    result = CliRunner().invoke(linkbench, [
        str(packet), "--bundle", str(bundle), "--lora", str(lora),
        "--links", "wifi,lorawan", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "linkbench.json").read_text())
    by = {r["artifact"]: r for r in rows if r["link"] == "wifi"}
    assert set(by) == {"full model", "LoRA", "LoRA zstd", "SOLAR packet"}
    files = sum((bundle / f).stat().st_size
                for f in ("model.onnx", "model.onnx.data", "weights/0000.npy"))
    assert (bundle / "model.onnx.data").stat().st_size == 64 * 64 * 4
    assert files <= by["full model"]["bytes"] <= files + 16 * 1024   # + tar headers, padding
    model_dtype = by["full model"]["dtype"]
    assert model_dtype.startswith("float32 ") and "float16" in model_dtype
    assert by["LoRA"]["dtype"] == "float32"            # an fp32 LoRA is not called fp16
    assert by["LoRA zstd"]["dtype"] == "float32 (zstd)"
    assert by["SOLAR packet"]["dtype"] == "float16"
    assert (out / "linkbench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| wifi | SOLAR packet | float16 |" in result.output
    assert "| model.onnx.data | 16.4 KB | float32 |" in result.output


def test_full_model_graph_brings_its_external_data(tmp_path):
    bundle = _bundle(tmp_path / "bundle")
    parts = model_parts(bundle / "model.onnx")
    assert [(p.rel, p.bytes, p.dtype) for p in parts] == [
        ("model.onnx", (bundle / "model.onnx").stat().st_size, "-"),
        ("model.onnx.data", 64 * 64 * 4, "float32")]
    (bundle / "model.onnx.data").unlink()
    with pytest.raises(BundleError, match="external data 'model.onnx.data'"):
        model_parts(bundle / "model.onnx")


def test_a_corrupt_safetensors_header_is_an_adapter_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterError, match="header length"):
        safetensors_dtypes(bad)


def test_cli_needs_the_bundle_or_a_model_file(tmp_path):
    packet = _packet(tmp_path / "p.slr")
    lora = tmp_path / "l.safetensors"
    save_file({"a": np.zeros(4, np.float16)}, lora)
    result = CliRunner().invoke(linkbench, [str(packet), "--lora", str(lora)])
    assert result.exit_code == 2 and "--bundle DIR" in result.output


def test_an_unknown_link_name_is_a_profile_error_naming_the_known_ones(tmp_path):
    packet = _packet(tmp_path / "p.slr")
    lora = tmp_path / "l.safetensors"
    save_file({"a": np.zeros(4, np.float16)}, lora)
    result = CliRunner().invoke(linkbench, [str(packet), "--full-model", str(lora),
                                            "--lora", str(lora), "--links", "ltem,nosuch"])
    assert isinstance(result.exception, ProfileError), result.output
    assert "unknown link 'nosuch'; known:" in str(result.exception)
