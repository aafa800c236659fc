"""Fleet operations on loopback: staged rollout by device id, status.json and the report
POST, the agent's exit code, the kept previous packet, and old state files."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from solar_edge.devices.repo import Expiry
from solar_edge.devices.rollout import eligible, rollout_bucket
from solar_edge.devices.state import StateStore
from solar_edge.errors import MetadataExpiredError, SignatureError


def _bucket(device_id: str, adapter_id: str, version: int) -> float:
    """The rollout rule written out independently of devices/rollout.py."""
    text = device_id + "\x00" + adapter_id + "\x00" + str(version)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def _device_ids(fraction: float, adapter_id: str, version: int) -> tuple[str, str]:
    """One device id inside the rollout fraction and one outside it."""
    ids = [f"dev-{i:04d}" for i in range(200)]
    inside = next(d for d in ids if _bucket(d, adapter_id, version) < fraction)
    outside = next(d for d in ids if _bucket(d, adapter_id, version) >= fraction)
    return inside, outside


def test_bucket_follows_the_published_rule_and_is_uniform_and_monotonic():
    ids = [f"unit-{i}" for i in range(2000)]
    for device_id in ids[:50]:
        assert rollout_bucket(device_id, "a", 3) == _bucket(device_id, "a", 3)
    in_30 = [d for d in ids if eligible(d, "a", 3, 0.3)]
    assert 538 <= len(in_30) <= 662            # 600 +- 3 sigma of a binomial(2000, 0.3)
    in_10 = {d for d in ids if eligible(d, "a", 3, 0.1)}
    assert in_10 <= set(in_30) and all(eligible(d, "a", 3, 1.0) for d in ids)
    assert {d for d in ids if eligible(d, "a", 4, 0.3)} != set(in_30)  # new draw per version


def test_staged_rollout_defers_devices_outside_the_fraction_until_it_is_raised(rig, tmp_path):
    inside, outside = _device_ids(0.5, "a", 2)
    v1, v2 = rig.packet("a", 1, scale=2.0), rig.packet("a", 2, scale=3.0)
    rig.publish(v1)
    rig.publish(v2, rollout=0.5)
    rig.start()
    devices = {}
    for device_id in (inside, outside):
        rig.tmp = tmp_path / device_id   # one state folder per device
        rig.tmp.mkdir()
        devices[device_id] = rig.agent(device_id=device_id)
    first = {d: [(o.version, o.action) for o in a.run()] for d, a in devices.items()}
    assert first == {inside: [(2, "installed")], outside: [(1, "installed"), (2, "deferred")]}
    assert [(o.version, o.action) for o in devices[outside].run()] == [(2, "deferred")]
    assert devices[outside].exit_code == 0
    status = json.loads(devices[outside].store.status_path.read_text())
    assert status["device_id"] == outside and status["installed"] == {"a": 1}
    assert status["outcomes"][0]["action"] == "deferred"
    rig.publish(v2, rollout=1.0)     # same bytes, wider rollout: not a replace
    assert [(o.version, o.action) for o in devices[outside].run()] == [(2, "installed")]
    assert list(devices[outside].applier.infer([1.0])) == [3.0]


def test_device_id_is_generated_once_and_kept(rig):
    rig.publish(rig.packet("a", 1))
    rig.start()
    first = rig.agent()
    again = rig.agent()
    assert first.device_id == again.device_id and first.device_id.startswith("dev-")
    assert (rig.tmp / "device" / "device_id").read_text().strip() == first.device_id
    assert rig.agent(device_id="board-7").device_id == "board-7"


class _Collector(BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_status_is_written_and_posted_after_every_cycle(rig):
    _Collector.bodies = []
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        rig.publish(rig.packet("a", 1, scale=2.0))
        rig.start()
        url = f"http://127.0.0.1:{collector.server_address[1]}/report"
        agent = rig.agent(device_id="board-1", report_url=url)
        agent.run(cycles=2)
    finally:
        collector.shutdown()
        collector.server_close()
    written = json.loads(agent.store.status_path.read_text())
    assert [ctype for ctype, _ in _Collector.bodies] == ["application/json"] * 2
    assert [b["outcomes"][0]["action"] for _, b in _Collector.bodies] == ["installed", "current"]
    assert _Collector.bodies[-1][1] == written
    assert written["device_id"] == "board-1" and written["installed"] == {"a": 1}
    assert written["active"] == "a" and written["error"] is None and written["exit_code"] == 0
    assert written["time"].endswith("Z")
    assert agent.reporter.sent == 2 and agent.reporter.failed == 0


def test_an_unreachable_or_stalling_report_url_is_logged_and_never_fatal(rig):
    rig.publish(rig.packet("a", 1))
    rig.start()
    agent = rig.agent(report_url="http://127.0.0.1:9/report")     # nothing listens
    assert [o.action for o in agent.run()] == ["installed"]
    assert agent.reporter.failed == 1 and agent.store.read_status()["exit_code"] == 0
    staller = socket.socket()
    staller.bind(("127.0.0.1", 0))
    staller.listen(8)        # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{staller.getsockname()[1]}/report"
        stalled = rig.agent(report_url=url, report_timeout_s=0.3)
        start = time.monotonic()
        stalled.run(cycles=3)
        elapsed = time.monotonic() - start
    finally:
        staller.close()
    assert elapsed < 3.0 and stalled.reporter.failed == 3 and stalled.reporter.sent == 0


def test_exit_code_says_whether_every_update_installed(rig):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from ota_doubles import make_test_packet

    rig.publish(rig.packet("a", 1))
    rig.start()
    agent = rig.agent()
    agent.run()
    assert agent.exit_code == 0
    rig.publish(make_test_packet(Ed25519PrivateKey.generate(), "b", 1))   # foreign key
    outcomes = agent.run()
    assert isinstance(outcomes[-1].error, SignatureError) and agent.exit_code == 1
    assert agent.store.read_status()["exit_code"] == 1
    rig.publish(rig.packet("a", 2), expiry=Expiry(timestamp=timedelta(seconds=-1)))
    assert agent.run(keep_going=True) == [] and agent.exit_code == 2
    assert agent.store.read_status()["error"].startswith("MetadataExpiredError")
    with pytest.raises(MetadataExpiredError):
        agent.run()


def test_one_previous_packet_is_kept_per_id_and_older_ones_pruned(rig):
    packets = [rig.packet("a", v, scale=float(v)) for v in (1, 2, 3)]
    rig.start()
    agent = None
    for packet in packets:
        rig.publish(packet)
        agent = rig.agent()
        agent.run()
    sha = [hashlib.sha256(p).hexdigest() for p in packets]
    state = agent.store.load()
    assert state.adapters["a"].sha256 == sha[2] and state.previous["a"].sha256 == sha[1]
    assert {p.name for p in agent.store.packets.iterdir()} == {f"{sha[1]}.slr", f"{sha[2]}.slr"}
    assert agent.applier.staged[-1:] == [sha[2]]      # the previous one is kept, not staged


def test_a_format_1_state_file_still_loads_and_the_agent_restores_it(rig):
    packet = rig.packet("a", 4, scale=5.0)
    store = StateStore(rig.tmp / "device")
    sha = store.store_packet(packet)
    store.path.write_text(json.dumps({"format": 1, "active": "a", "rejected": {},
                                      "adapters": {"a": {"version": 4, "sha256": sha}}}))
    rig.publish(packet)
    rig.start()
    agent = rig.agent()
    assert list(agent.applier.infer([1.0])) == [5.0]
    assert [o.action for o in agent.run()] == ["current"]
    assert agent.store.load().previous == {} and agent.store.load().pinned == {}


def test_a_damaged_state_file_is_reported_in_status_and_raised_typed(rig):
    from solar_edge.errors import StateError

    rig.publish(rig.packet("a", 1))
    rig.start()
    agent = rig.agent()
    agent.run()
    agent.store.path.write_text('{"format": 2, "adapters": [], "active": null}')
    with pytest.raises(StateError):
        agent.run()
    status = agent.store.read_status()
    assert status["error"].startswith("StateError") and status["outcomes"] == []
    assert status["exit_code"] == 2 and agent.exit_code == 2


def test_an_https_server_url_is_refused_at_once_not_retried(rig):
    from solar_edge.errors import DownloadError

    rig.publish(rig.packet("a", 1))
    with pytest.raises(DownloadError, match="only http:// URLs"):
        rig.agent(url="https://127.0.0.1:8765")
    assert rig.sleeps == []
