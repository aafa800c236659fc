"""Crash-safe agent state: round trip, atomic replace, damaged files are typed errors."""

from __future__ import annotations

import hashlib

import pytest

from solar_edge.devices.state import AgentState, Installed, StateStore, atomic_write
from solar_edge.errors import StateError


def test_round_trip_and_no_temp_files_left(tmp_path):
    store = StateStore(tmp_path)
    assert store.load() == AgentState()
    state = AgentState({"a": Installed(3, "ab" * 32)}, "a", {"cd" * 32: "SignatureError: x"})
    store.save(state)
    assert store.load() == state
    store.save(AgentState())
    assert store.load() == AgentState()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("text", [
    "", "{", "[]", '{"format": 3, "adapters": {}, "active": null}',
    '{"format": 1, "adapters": {}, "active": "ghost"}',
    '{"format": 1, "adapters": {"a": {"version": "x", "sha256": "0"}}, "active": null}',
])
def test_malformed_state_is_a_state_error(tmp_path, text):
    store = StateStore(tmp_path)
    store.path.write_text(text)
    with pytest.raises(StateError):
        store.load()


def test_packets_are_content_addressed_and_rehashed_on_read(tmp_path):
    store = StateStore(tmp_path)
    data = b"packet bytes"
    sha = store.store_packet(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.read_packet(sha) == data
    store.packet_path(sha).write_bytes(b"packet bytez")
    with pytest.raises(StateError, match="does not match"):
        store.read_packet(sha)
    with pytest.raises(StateError, match="missing"):
        store.read_packet("0" * 64)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f"
    atomic_write(target, b"old" * 1000)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_prune_keeps_only_referenced_packets(tmp_path):
    store = StateStore(tmp_path)
    keep, drop = store.store_packet(b"keep"), store.store_packet(b"drop")
    store.prune_packets(AgentState({"a": Installed(1, keep)}, "a"))
    assert store.packet_path(keep).exists() and not store.packet_path(drop).exists()
