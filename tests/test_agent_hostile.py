"""A repository key holder lists hostile targets: values from signed metadata never become
paths, and a corrupt cached root falls back to the provisioned one.

The hostile targets metadata is signed with the repository's own test key (python-tuf
Metadata API, ``Repository.write_targets``), so it passes TUF and reaches the agent."""

from __future__ import annotations

import hashlib
import logging

import pytest
from ota_doubles import InMemoryApplier
from ota_rig import Rig
from tuf.api.metadata import TargetFile

from solar_edge.devices.agent import Agent, AgentConfig, RetryPolicy
from solar_edge.devices.fetcher import DownloadPolicy, HttpTransport
from solar_edge.errors import RepositoryError


def _list_hostile(rig: Rig, path: str, length: int, hashes: dict, custom: dict) -> None:
    targets = rig.repo.targets()
    targets.targets[path] = TargetFile.from_dict(
        {"length": length, "hashes": hashes, "custom": custom}, path)
    rig.repo.write_targets(targets)


def _outside(tmp_path):
    """Every path under tmp_path except the agent's state folder, with file contents."""
    return {p.relative_to(tmp_path).as_posix(): p.read_bytes() if p.is_file() else None
            for p in tmp_path.rglob("*") if "device" not in p.relative_to(tmp_path).parts}


GOOD_SHA = "ab" * 32
HOSTILE = {
    "hash is a relative path": ("adapters/a/v2.slr", {"sha256": "../../victim"},
                                {"adapter_id": "a", "version": 2}, "64 lowercase hex"),
    "hash is an absolute path": ("adapters/a/v2.slr", {"sha256": "/tmp/victim"},
                                 {"adapter_id": "a", "version": 2}, "64 lowercase hex"),
    "another hash algorithm": ("adapters/a/v2.slr", {"sha512": "cd" * 64},
                               {"adapter_id": "a", "version": 2}, "sha512="),
    "uppercase hex": ("adapters/a/v2.slr", {"sha256": GOOD_SHA.upper()},
                      {"adapter_id": "a", "version": 2}, "64 lowercase hex"),
    "id is a path": ("adapters/../../victim/v1.slr", {"sha256": GOOD_SHA},
                     {"adapter_id": "../../victim", "version": 1}, "id rule"),
    "path is not the id's": ("adapters/a/../../../victim/v2.slr", {"sha256": GOOD_SHA},
                             {"adapter_id": "a", "version": 2}, "is not named"),
    "version is a string": ("adapters/a/v2.slr", {"sha256": GOOD_SHA},
                            {"adapter_id": "a", "version": "2"}, "not an integer"),
    "version is zero": ("adapters/a/v0.slr", {"sha256": GOOD_SHA},
                        {"adapter_id": "a", "version": 0}, "not an integer"),
    "rollout is not a fraction": ("adapters/a/v2.slr", {"sha256": GOOD_SHA},
                                  {"adapter_id": "a", "version": 2, "rollout": "1.5"},
                                  "0 < f <= 1"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_target_values_never_touch_a_path_and_the_rest_still_installs(
        rig, tmp_path, case):
    path, hashes, custom, message = HOSTILE[case]
    good = rig.packet("b", 1, scale=4.0)
    rig.publish(good)
    _list_hostile(rig, path, 1000, hashes, custom)
    (tmp_path / "victim").write_bytes(b"keep me")          # what partial/../../victim reaches
    (tmp_path / "victim.part").write_bytes(b"keep me too")
    rig.start()
    before = _outside(tmp_path)
    agent = rig.agent()
    outcomes = agent.run()
    rejected = [o for o in outcomes if o.action == "rejected"]
    assert len(rejected) == 1 and type(rejected[0].error) is RepositoryError
    assert message in str(rejected[0].error)
    assert [(o.adapter_id, o.action) for o in outcomes if o is not rejected[0]] == \
        [("b", "installed")]
    assert list(agent.applier.infer([1.0])) == [4.0]
    assert agent.exit_code == 1
    assert _outside(tmp_path) == before                      # nothing created or removed
    assert not list(agent.store.partial.iterdir())
    assert {p.name for p in agent.store.packets.iterdir()} == \
        {hashlib.sha256(good).hexdigest() + ".slr"}
    # the server was never asked for a hostile URL
    assert all(".." not in p and "victim" not in p for p, _ in rig.server.requests)


def test_corrupt_cached_root_falls_back_to_the_provisioned_root(rig, caplog):
    rig.publish(rig.packet("a", 1, scale=2.0))
    rig.start()
    rig.agent().run()
    cached = rig.tmp / "device" / "metadata" / "root.json"
    assert cached.exists()
    cached.write_bytes(b"{ not json")          # follows the symlink into root_history
    rig.publish(rig.packet("a", 2, scale=3.0))
    agent = rig.agent()
    with caplog.at_level(logging.WARNING, logger="solar_edge.agent"):
        [outcome] = agent.run()
    assert (outcome.version, outcome.action) == (2, "installed")
    assert any("unusable" in r.message and "provisioned root" in r.message
               for r in caplog.records)
    assert list(agent.applier.infer([1.0])) == [3.0]
    assert [o.action for o in rig.agent().run()] == ["current"]   # the cache is whole again


def test_corrupt_cached_root_without_a_provisioned_root_is_a_typed_error(rig):
    rig.publish(rig.packet("a", 1))
    rig.start()
    rig.agent().run()
    (rig.tmp / "device" / "metadata" / "root.json").write_bytes(b"\x00" * 10)
    config = AgentConfig(rig.server.url, rig.tmp / "device", trusted_root=None,
                         download=DownloadPolicy(backoff_s=0.01),
                         retry=RetryPolicy(attempts=1))
    agent = Agent(config, InMemoryApplier(rig.key.public_key()), HttpTransport(timeout_s=5),
                  sleep=rig.sleeps.append)
    agent.start()
    with pytest.raises(RepositoryError, match="unusable .* no root is provisioned"):
        agent.run()
    assert agent.exit_code == 2
    assert agent.store.read_status()["error"].startswith("RepositoryError: cached")


def test_targets_that_are_not_adapter_packets_are_ignored(rig, tmp_path):
    rig.publish(rig.packet("b", 1))
    _list_hostile(rig, "../../victim", 10, {"sha256": "../../victim"}, {"note": "docs"})
    rig.start()
    before = _outside(tmp_path)
    agent = rig.agent()
    assert [(o.adapter_id, o.action) for o in agent.run()] == [("b", "installed")]
    assert agent.exit_code == 0 and _outside(tmp_path) == before
