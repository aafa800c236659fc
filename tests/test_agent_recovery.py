"""The agent recovers instead of sticking: what the rejection cache holds, per-adapter
failures, damaged stored packets, older acceptable versions, stale partial files."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_doubles import InMemoryApplier, double_facts, make_test_packet
from tuf.api.metadata import TargetFile

from solar_edge.devices.agent import RetryPolicy
from solar_edge.devices.applier import RuntimeApplier
from solar_edge.devices.fetcher import Body, HttpTransport
from solar_edge.errors import DownloadError, LimitExceededError, SignatureError


class KeyedApplier(InMemoryApplier):
    """The double, naming its trusted key the way RuntimeApplier.trust_tag does."""

    def __init__(self, trusted, tag: str) -> None:
        super().__init__(trusted)
        self.trust_tag = tag


def _forge(rig, path: str, data: bytes, length: int, **custom) -> None:
    """Re-sign targets (repository key) listing only ``path`` -> sha256(data), ``length``."""
    targets = rig.repo.targets()
    targets.targets.clear()
    info = TargetFile(length, {"sha256": hashlib.sha256(data).hexdigest()}, path)
    info.unrecognized_fields["custom"] = custom
    targets.targets[path] = info
    rig.repo.write_targets(targets)


def _actions(outcomes) -> list[tuple[str, int, str]]:
    return [(o.adapter_id, o.version, o.action) for o in outcomes]


def test_a_forged_length_does_not_block_the_genuine_packet_later(rig):
    good = rig.packet("a", 1, scale=2.0)
    rig.publish(good)
    _forge(rig, "adapters/lh/v1.slr", good, 10**12, adapter_id="lh", version=1)
    rig.start()
    agent = rig.agent()
    [poisoned] = agent.run()
    assert poisoned.action == "rejected" and isinstance(poisoned.error, LimitExceededError)
    assert agent.store.load().rejected == {}     # what the metadata claims is not cached
    rig.publish(good, replace=True)              # clean metadata again
    assert _actions(agent.run()) == [("a", 1, "installed")]


def test_a_rejection_is_rechecked_under_other_trusted_keys(rig):
    other = Ed25519PrivateKey.generate()
    rig.publish(make_test_packet(other, "a", 1))
    rig.start()
    first = rig.agent(applier=KeyedApplier(rig.key.public_key(), "k1"))
    [rejected] = first.run()
    assert isinstance(rejected.error, SignatureError)
    [again] = rig.agent(applier=KeyedApplier(rig.key.public_key(), "k1")).run()
    assert "rejected before: SignatureError" in str(again.error)
    trusting = rig.agent(applier=KeyedApplier(other.public_key(), "k2"))
    assert _actions(trusting.run()) == [("a", 1, "installed")]


def test_runtime_applier_trust_tag_follows_the_trusted_keys():
    def tag(*ids: bytes) -> str:
        return RuntimeApplier(lambda: SimpleNamespace(keys=dict.fromkeys(ids))).trust_tag

    assert tag(b"\x01", b"\x02") == tag(b"\x02", b"\x01") != tag(b"\x01")


def test_a_missing_packet_file_fails_only_its_adapter(rig):
    a, b = rig.packet("a", 1), rig.packet("b", 1)
    rig.publish(a, b)
    rig.target_file(a, "a", 1).unlink()
    rig.start()
    agent = rig.agent()
    outcomes = agent.run()
    assert _actions(outcomes) == [("a", 1, "failed"), ("b", 1, "installed")]
    assert isinstance(outcomes[0].error, DownloadError) and "404" in str(outcomes[0].error)
    assert agent.exit_code == 1 and agent.last_error is None
    assert set(agent.store.load().adapters) == {"b"}


def test_a_bad_newest_version_does_not_hide_a_valid_older_one(rig):
    rig.publish(rig.packet("a", 1, scale=2.0))
    rig.start()
    agent = rig.agent()
    agent.run()
    bad = make_test_packet(Ed25519PrivateKey.generate(), "a", 3)
    rig.publish(rig.packet("a", 2, scale=3.0), bad)
    outcomes = agent.run()
    assert _actions(outcomes) == [("a", 3, "rejected"), ("a", 2, "installed")]
    assert agent.store.load().adapters["a"].version == 2
    assert list(agent.applier.infer([1.0])) == [3.0]


def test_a_damaged_stored_packet_falls_back_to_the_previous_one(rig, caplog):
    v1, v2 = rig.packet("a", 1, scale=2.0), rig.packet("a", 2, scale=3.0)
    rig.publish(v1)
    rig.start()
    rig.agent().run()
    rig.publish(v2)
    agent = rig.agent()
    agent.run()
    stored = agent.store.packet_path(hashlib.sha256(v2).hexdigest())
    damaged = bytearray(stored.read_bytes())
    damaged[50] ^= 1
    stored.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, "solar_edge.agent"):
        restarted = rig.agent()
    assert "does not match its hash" in caplog.text and "previous v1" in caplog.text
    assert restarted.store.load().adapters["a"].version == 1 and not stored.exists()
    assert restarted.applier.active == "a" and restarted.applier.active_version == 1
    assert _actions(restarted.run()) == [("a", 2, "installed")]


def test_a_deleted_only_packet_leaves_nothing_installed_until_fetched_again(rig):
    packet = rig.packet("a", 1)
    rig.publish(packet)
    rig.start()
    rig.agent().run()
    rig.agent().store.packet_path(hashlib.sha256(packet).hexdigest()).unlink()
    restarted = rig.agent()
    state = restarted.store.load()
    assert state.adapters == {} and state.active is None and restarted.applier.active is None
    assert _actions(restarted.run()) == [("a", 1, "installed")]


def test_stale_partial_files_are_removed_at_start(rig):
    packet = rig.packet("a", 1)
    rig.publish(packet)
    rig.start()
    agent = rig.agent()
    agent.run()
    sha = hashlib.sha256(packet).hexdigest()
    (agent.store.partial / f"{sha}.part").write_bytes(packet[:10])  # killed after commit
    (agent.store.partial / f"{'0' * 64}.part").write_bytes(b"")      # empty
    (agent.store.partial / "junk.part").write_bytes(b"x")
    resumable = agent.store.partial / f"{'1' * 64}.part"
    resumable.write_bytes(b"half")
    rig.agent()
    assert list(agent.store.partial.iterdir()) == [resumable]


def test_a_mix_and_match_rejection_leaves_no_partial_file(rig):
    def lie(data: bytes):
        return dataclasses.replace(double_facts(data), version=2)

    rig.repo.publish([rig.packet("a", 1)], facts_reader=lie)   # listed v2, packet says v1
    rig.start()
    agent = rig.agent()
    [outcome] = agent.run()
    assert outcome.action == "rejected" and "mix-and-match" in str(outcome.error)
    assert list(agent.store.partial.iterdir()) == []


class NoLengthTransport(HttpTransport):
    """Bodies without a declared total, as a server that sends no Content-Length."""

    def get(self, url: str, start: int = 0, deadline_s: float | None = None) -> Body:
        body = super().get(url, start, deadline_s)
        return Body(body.offset, None, body.chunks, body.close)


def test_an_over_long_response_leaves_no_empty_partial_file(rig):
    packet = rig.packet("a", 1, pad=40_000)
    rig.publish(packet)
    _forge(rig, "adapters/a/v1.slr", packet, 100, adapter_id="a", version=1)
    rig.start()
    agent = rig.agent(transport=NoLengthTransport(timeout_s=5))
    [outcome] = agent.run()
    assert outcome.action == "rejected" and "more than the 100 bytes" in str(outcome.error)
    assert list(agent.store.partial.iterdir()) == []


def test_garbage_and_endless_metadata_errors_name_the_file(rig):
    rig.publish(rig.packet("a", 1))
    rig.start()
    timestamp = rig.repo_dir / "metadata" / "timestamp.json"
    timestamp.write_bytes(b"{not json")
    agent = rig.agent(retry=RetryPolicy(attempts=1))
    agent.run(keep_going=True)
    assert "timestamp.json" in str(agent.last_error)
    timestamp.write_bytes(b" " * 100_000)
    agent.run(keep_going=True)
    assert "timestamp.json" in str(agent.last_error) and "exceeding" in str(agent.last_error)
