"""linkbench through the real throttled server: measured agrees with the model."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from solar_edge.devices.cli import linkbench
from solar_edge.devices.linkbench import prefix_for, run_linkbench
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


def test_cli_writes_table_json_and_png(tmp_path):
    for name, n in (("m", 50_000), ("l", 8_000), ("p", 500)):
        (tmp_path / name).write_bytes(os.urandom(n))
    out = tmp_path / "out"
    result = CliRunner().invoke(linkbench, [
        "--full-model", str(tmp_path / "m"), "--lora", str(tmp_path / "l"),
        "--packet", str(tmp_path / "p"), "--links", "wifi,lorawan", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "linkbench.json").read_text())
    assert {r["artifact"] for r in rows} == {"full model", "LoRA fp16", "LoRA zstd",
                                             "SOLAR packet"}
    assert (out / "linkbench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| wifi | SOLAR packet |" in result.output
