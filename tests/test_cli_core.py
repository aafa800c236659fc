"""`solar-edge keygen` and `solar-edge inspect`, through the real click group and entry point."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from importlib import resources

import pytest
from click.testing import CliRunner

from solar_edge.cli import cli
from solar_edge.format import signing

GOLDEN = resources.files("solar_edge") / "golden"
GOLDEN_PACKET = str(GOLDEN / "golden.slr")
GOLDEN_PUB = str(GOLDEN / "TEST-ONLY-golden-signing.pub")


def test_keygen_writes_a_usable_key_pair(tmp_path):
    result = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "keys"), "--name", "ops"])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "keys" / "ops.key", tmp_path / "keys" / "ops.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing.load_private_key(private)
    assert signing.key_id(signing.load_public_key(public)) == signing.key_id(key)
    assert f"key id:      {signing.key_id(key).hex()}" in result.output


def test_keygen_refuses_to_overwrite_unless_forced(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["keygen", "--out", str(tmp_path)]).exit_code == 0
    first = (tmp_path / "signing.pub").read_text()
    again = runner.invoke(cli, ["keygen", "--out", str(tmp_path)])
    assert again.exit_code != 0 and "refusing to overwrite" in str(again.exception)
    assert (tmp_path / "signing.pub").read_text() == first
    assert runner.invoke(cli, ["keygen", "--out", str(tmp_path), "--force"]).exit_code == 0
    assert (tmp_path / "signing.pub").read_text() != first


def test_keygen_rejects_path_like_names(tmp_path):
    result = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path), "--name", "../evil"])
    assert result.exit_code == 2 and "--name" in result.output
    assert not (tmp_path.parent / "evil.key").exists()


def test_inspect_text_with_verified_signature():
    result = CliRunner().invoke(cli, ["inspect", GOLDEN_PACKET, "--key", GOLDEN_PUB])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "golden-task.v1 v7" in out and "PHILOX4X32_10 UNIFORM seed=0x123456789abcdef" in out
    assert "signature key 5174136432bda28c: verified" in out
    assert "total 340 = header 136 + body 132 + key id/signature 72" in out
    assert "layer table 90 + positions 6 + values 36" in out
    rows = [line.split() for line in out.splitlines()[-3:]]
    assert rows[0] == ["1", "SPARSE_CORE", "INT4", "16x16", "0", "5", "5", "4", "3", "0.25", "43"]
    assert rows[2][:5] == ["9", "DENSE_FACTORS", "INT3", "4x3", "1"]


def test_inspect_json_parts_add_up():
    result = CliRunner().invoke(cli, ["inspect", GOLDEN_PACKET, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["signature"].startswith("not checked")
    b = info["bytes"]
    assert b["header"] + b["body_stored"] + b["key_id_and_signature"] == b["total"] == 340
    assert b["layer_table"] + b["positions"] + b["values"] == b["body_stored"]
    assert [lay["layer_id"] for lay in info["layers"]] == [1, 4, 9]
    assert info["metadata"]["labels"] == ["neg", "pos"]


def test_inspect_columns_align_for_the_longest_record_kind(tmp_path):
    """MAGNITUDE_DELTA (15 characters) must not push its row's columns right of the header's."""
    import numpy as np

    from solar_edge.format.packet import PacketHeader
    from solar_edge.format.records import (
        CodecHeader,
        LayerRecord,
        QuantizedValues,
        RecordKind,
        ValueFormat,
    )
    from solar_edge.format.writer import encode_packet

    def vec(kind: RecordKind) -> LayerRecord:
        return LayerRecord(0, kind, 5, 1, 0, QuantizedValues(ValueFormat.FLOAT16, 5,
                                                             raw=np.ones(5, np.float16)))

    key = signing.generate_private_key()
    records = [vec(RecordKind.BIAS_DELTA), vec(RecordKind.MAGNITUDE_DELTA)]
    path = tmp_path / "p.slr"
    path.write_bytes(encode_packet(PacketHeader(bytes(32), "a", 1, {}), CodecHeader(0), records,
                                   key))
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    rows = [line for line in lines if "_DELTA" in line]
    assert [row.split()[1] for row in rows] == ["BIAS_DELTA", "MAGNITUDE_DELTA"]
    for row in rows:
        assert row.index("FLOAT16") == header.index("format"), (header, row)
        assert len(row) == len(header), (header, row)  # right-aligned columns end together


def _entry_point(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "solar_edge.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_inspect_untrusted_key_exits_2_with_the_error(tmp_path):
    signing.save_public_key(signing.generate_private_key(), tmp_path / "other.pub")
    proc = _entry_point("inspect", GOLDEN_PACKET, "--key", str(tmp_path / "other.pub"))
    assert proc.returncode == 2
    assert "SignatureError: key_id: key id 5174136432bda28c is not trusted" in proc.stderr


def test_inspect_corrupt_packet_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.slr"
    bad.write_bytes((GOLDEN / "golden.slr").read_bytes()[:200])
    proc = _entry_point("inspect", str(bad))
    assert proc.returncode == 2 and "TruncatedPacketError: body:" in proc.stderr


@pytest.mark.parametrize("args", [("compress",), ("inspect", "--nosuch"),
                                  ("run", "missing.slr", "--bundle", "nowhere")])
def test_usage_errors_are_one_line_naming_the_help(args):
    proc = _entry_point(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f" {args[0]} --help')" in proc.stderr


def test_with_json_a_failure_is_also_one_json_object_on_stdout(tmp_path):
    bad = tmp_path / "bad.slr"
    bad.write_bytes((GOLDEN / "golden.slr").read_bytes()[:200])
    proc = _entry_point("inspect", str(bad), "--json")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    report = json.loads(proc.stdout)
    assert report["error_type"] == "TruncatedPacketError" and report["exit_code"] == 2
    assert report["error"].startswith("TruncatedPacketError: body:")
    usage = _entry_point("inspect", "--nosuch", "--json")
    assert json.loads(usage.stdout)["error_type"] == "UsageError" and usage.returncode == 2
    assert _entry_point("inspect", str(bad)).stdout == ""   # without --json: stderr only
