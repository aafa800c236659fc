"""A tiny fleet simulation (bench/fleet.py): 20 agents against a real nginx, two rollout
phases. The eligible devices are computed here from the documented bucket formula."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from solar_edge.devices.nginx import nginx_binary

FLEET = Path(__file__).resolve().parents[1] / "bench" / "fleet.py"
pytestmark = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (apt-get install -y nginx)")


def _bucket(device: str) -> float:
    """docs/fleet.md: first 8 bytes of sha256(device \\0 adapter \\0 version) / 2**64."""
    digest = hashlib.sha256(f"{device}\0fleet-task\0{1}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def test_staged_rollout_of_twenty_agents(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(FLEET), "--agents", "20", "--phases", "0.3,1",
                           "--foreign", "0.1", "--concurrency", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 60
    result = json.loads((tmp_path / "fleet.json").read_text())
    devices = [f"dev-{i:04d}" for i in range(20)]
    foreign, native = devices[:2], devices[2:]
    early = [d for d in native if _bucket(d) < 0.3]
    one, two = result["phases"]
    assert (one["installed"], one["deferred"]) == (len(early), 18 - len(early) + sum(
        _bucket(d) >= 0.3 for d in foreign))
    assert one["rejected"] == sum(_bucket(d) < 0.3 for d in foreign)
    assert (two["installed"], two["deferred"], two["rejected"]) == (18 - len(early), 0, 2)
    assert one["bytes_packets"] == (one["installed"] + one["rejected"]) * result["packet_bytes"]
    assert two["on_v1"] == 18 and result["time_to_full_rollout_s"] is not None
    assert result["reports_received"] == 40
    assert result["census_reports"] == result["census_status_files"] == {"1": 18, "none": 2}
    assert result["rejected_by"] == {"BaseMismatchError": 2}
    assert result["rejected_devices"] == foreign
    assert "| 2 | 1 | 20 |" in (tmp_path / "fleet.md").read_text()
