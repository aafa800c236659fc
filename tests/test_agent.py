"""The update agent on loopback: real server, real HTTP client, TUF metadata, and the
in-memory runtime double (tests/ota_doubles.py). Real runtime: test_agent_runtime.py."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_doubles import BASE, make_test_packet
from ota_rig import Rig

from solar_edge.devices.agent import Agent, RetryPolicy
from solar_edge.devices.fetcher import DownloadPolicy, MemoryTransport
from solar_edge.devices.repo import Expiry
from solar_edge.errors import (
    BaseMismatchError,
    DownloadError,
    HealthCheckError,
    IntegrityError,
    MetadataExpiredError,
    MetadataRollbackError,
    MetadataSignatureError,
    RollbackError,
    SignatureError,
)
from solar_edge.profiles.links import LinkProfile


def _state(agent: Agent) -> dict:
    return json.loads(agent.store.path.read_text())


def test_installs_newest_version_per_adapter_and_keeps_first_active(rig):
    rig.publish(rig.packet("a", 1, scale=2.0), rig.packet("a", 2, scale=3.0),
                rig.packet("b", 1, scale=5.0))
    rig.start()
    agent = rig.agent()
    outcomes = agent.run()
    assert [(o.adapter_id, o.version, o.action) for o in outcomes] == [
        ("a", 2, "installed"), ("b", 1, "installed")]
    assert all(o.download_s > 0 and o.apply_s > 0 and o.bytes > 0 for o in outcomes)
    assert "a v2: installed [" in str(outcomes[0])
    assert agent.applier.active == "a" and agent.applier.active_version == 2
    assert list(agent.applier.infer([1.0])) == [3.0]
    state = _state(agent)
    assert state["active"] == "a"
    assert state["adapters"]["a"]["version"] == 2 and state["adapters"]["b"]["version"] == 1
    assert [o.action for o in agent.run()] == ["current", "current"]
    agent.switch("b")
    restarted = rig.agent()
    assert restarted.applier.active == "b" and list(restarted.applier.infer([1.0])) == [5.0]


def test_interrupted_download_resumes_with_range_and_completes(rig):
    packet = rig.packet("a", 1, pad=300_000)
    rig.publish(packet)
    server = rig.start()
    path = "/" + rig.target_file(packet, "a", 1).relative_to(rig.repo_dir).as_posix()
    server.faults.drop(path, 100_000, times=2)
    agent = rig.agent()
    [outcome] = agent.run()
    assert outcome.action == "installed", outcome
    ranges = [r for p, r in server.requests if p == path]
    assert ranges == [None, "bytes=100000-", "bytes=200000-"]
    assert agent.applier.staged == [hashlib.sha256(packet).hexdigest()]
    assert not list(agent.store.partial.iterdir())


def test_partial_file_survives_a_failed_cycle_and_is_resumed_next_time(rig):
    packet = rig.packet("a", 1, pad=200_000)
    rig.publish(packet)
    server = rig.start()
    path = "/" + rig.target_file(packet, "a", 1).relative_to(rig.repo_dir).as_posix()
    server.faults.drop(path, 150_000)
    agent = rig.agent(download=DownloadPolicy(attempts=1),
                      retry=RetryPolicy(attempts=1))
    [failed] = agent.run()   # a failed target download is that adapter's outcome
    assert failed.action == "failed" and isinstance(failed.error, DownloadError)
    assert "150000" in str(failed.error) and agent.exit_code == 1
    [part] = agent.store.partial.iterdir()
    assert part.stat().st_size == 150_000
    assert agent.store.load().adapters == {}
    assert [o.action for o in rig.agent().run()] == ["installed"]
    assert [r for p, r in server.requests if p == path][-1] == "bytes=150000-"


def test_corrupted_bytes_are_rejected_with_integrity_error(rig):
    good = rig.packet("a", 1, scale=2.0)
    rig.publish(good)
    rig.start()
    target = rig.target_file(good, "a", 1)
    flipped = bytearray(good)
    flipped[40] ^= 0x01
    target.write_bytes(bytes(flipped))
    agent = rig.agent()
    [outcome] = agent.run()
    assert outcome.action == "rejected" and isinstance(outcome.error, IntegrityError)
    assert agent.applier.active is None and agent.store.load().adapters == {}
    assert not list(agent.store.partial.iterdir())
    target.write_bytes(good + b"more and more")   # endless data: longer than signed
    [outcome] = agent.run()
    assert isinstance(outcome.error, IntegrityError)
    target.write_bytes(good)   # the mirror is repaired: the same target now installs
    assert [o.action for o in agent.run()] == ["installed"]


def test_bad_packet_signature_is_rejected_even_with_valid_metadata(rig):
    forged = make_test_packet(Ed25519PrivateKey.generate(), "a", 1)
    rig.publish(forged)
    rig.start()
    agent = rig.agent()
    [outcome] = agent.run()
    assert isinstance(outcome.error, SignatureError)
    assert hashlib.sha256(forged).hexdigest() in _state(agent)["rejected"]
    assert agent.applier.staged == []


def test_wrong_base_model_is_rejected(rig):
    rig.publish(rig.packet("a", 1, fingerprint="c" * 64))
    rig.start()
    agent = rig.agent()
    [outcome] = agent.run()
    assert isinstance(outcome.error, BaseMismatchError) and agent.applier.active is None
    assert agent.applier.fingerprint == BASE


def test_older_version_is_rejected_after_a_newer_one(rig):
    rig.publish(rig.packet("a", 2, scale=7.0))
    rig.start()
    agent = rig.agent()
    agent.run()
    rig.publish(rig.packet("a", 1, scale=1.0), replace=True)
    [outcome] = agent.run()
    assert outcome.action == "rejected" and isinstance(outcome.error, RollbackError)
    assert agent.applier.active_version == 2 and list(agent.applier.infer([1.0])) == [7.0]


def test_expired_metadata_is_rejected(rig):
    rig.publish(rig.packet("a", 1), expiry=Expiry(targets=timedelta(seconds=-1)))
    rig.start()
    agent = rig.agent()
    with pytest.raises(MetadataExpiredError):
        agent.run()
    assert agent.applier.staged == []


def test_tampered_metadata_is_rejected(rig):
    rig.publish(rig.packet("a", 1))
    rig.start()
    meta = rig.repo_dir / "metadata" / "1.targets.json"
    doc = json.loads(meta.read_text())
    info = doc["signed"]["targets"]["adapters/a/v1.slr"]
    info["custom"]["version"] = 9
    meta.write_text(json.dumps(doc))
    with pytest.raises(MetadataSignatureError):
        rig.agent().run()


def test_metadata_rollback_is_rejected(rig):
    rig.publish(rig.packet("a", 1))
    old_timestamp = (rig.repo_dir / "metadata/timestamp.json").read_bytes()
    rig.publish(rig.packet("a", 2))
    rig.start()
    agent = rig.agent()
    agent.run()
    (rig.repo_dir / "metadata/timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(MetadataRollbackError):
        agent.run()
    assert agent.applier.active_version == 2


def test_a_packet_failing_the_health_probe_never_serves(rig):
    rig.publish(rig.packet("a", 1, scale=2.0))
    rig.start()
    agent = rig.agent()
    agent.run()
    rig.publish(rig.packet("a", 2, scale=float("nan")))
    [outcome] = agent.run()
    assert isinstance(outcome.error, HealthCheckError)
    assert agent.applier.active_version == 1 and list(agent.applier.infer([1.0])) == [2.0]
    assert _state(agent)["adapters"]["a"]["version"] == 1
    assert [o.action for o in agent.run()] == ["rejected"]   # not retried forever


def test_server_down_then_up_agent_backs_off_and_recovers(rig):
    rig.publish(rig.packet("a", 1, scale=4.0))
    probe = rig.start()
    port = probe.server_address[1]
    probe.stop()
    rig.server = None
    served_during_outage = []

    def sleep(delay):
        rig.sleeps.append(delay)
        served_during_outage.append(list(agent.applier.infer([1.0])))
        if len(rig.sleeps) == 3:
            rig.start(port=port)

    agent = rig.agent(url=f"http://127.0.0.1:{port}", sleep=sleep,
                      retry=RetryPolicy(attempts=6, base_s=0.5, max_s=1.5))
    [outcome] = agent.run()
    assert outcome.action == "installed"
    assert rig.sleeps == [0.5, 1.0, 1.5]
    assert served_during_outage == [[1.0]] * 3   # the base model kept answering


def test_backoff_is_bounded_when_the_server_never_returns(rig):
    rig.publish(rig.packet("a", 1))
    agent = rig.agent(url="http://127.0.0.1:9", retry=RetryPolicy(attempts=4, base_s=1, max_s=3))
    with pytest.raises(DownloadError):
        agent.run()
    assert rig.sleeps == [1, 2, 3]


def test_slow_retrieval_is_cut_off(tmp_path):
    rig = Rig(tmp_path, link=LinkProfile("slow", "tcp", rate_bps=20_000, latency_s=0.0,
                                         loss=0.0, mtu=1500))
    rig.publish(rig.packet("a", 1, pad=20_000))
    rig.start()
    try:
        agent = rig.agent(download=DownloadPolicy(attempts=1, min_rate_bps=400_000, grace_s=0.5),
                          retry=RetryPolicy(attempts=1))
        [outcome] = agent.run(cycles=1)
        assert outcome.action == "failed" and isinstance(outcome.error, DownloadError)
        assert "too slow" in str(outcome.error)
    finally:
        rig.server.stop()


def test_agent_runs_against_the_in_memory_transport(tmp_path):
    """The same agent over MemoryTransport: no sockets, drops injected by the double."""
    rig = Rig(tmp_path)
    packet = rig.packet("a", 1, pad=50_000)
    rig.publish(packet)
    files = {"/" + p.relative_to(rig.repo_dir).as_posix(): p.read_bytes()
             for p in rig.repo_dir.rglob("*") if p.is_file()}
    transport = MemoryTransport(files)
    target = "/" + rig.target_file(packet, "a", 1).relative_to(rig.repo_dir).as_posix()
    transport.drops[target] = [20_000]
    agent = rig.agent(transport=transport, url="http://repo.invalid")
    assert [o.action for o in agent.run()] == ["installed"]
    assert (target, 20_000) in transport.requests


def test_long_running_agent_keeps_going_after_a_bad_cycle(rig):
    rig.publish(rig.packet("a", 1), expiry=Expiry(timestamp=timedelta(seconds=-1)))
    rig.start()
    agent = rig.agent()
    calls = []

    def sleep(delay):
        calls.append(delay)
        rig.publish(rig.packet("a", 2, scale=6.0))   # the owner re-signs with a fresh expiry

    agent.sleep = sleep
    outcomes = agent.run(cycles=2, interval_s=30, keep_going=True)
    assert calls == [30]
    assert [(o.version, o.action) for o in outcomes] == [(2, "installed")]
    assert list(agent.applier.infer([1.0])) == [6.0]
