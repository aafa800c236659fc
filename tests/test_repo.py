"""Publishing packets as a TUF repository, verified by python-tuf's own client."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_doubles import double_facts, make_test_packet
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from solar_edge.devices.packetinfo import PacketFacts
from solar_edge.devices.repo import Expiry, Repository, root_path, signer_from_key, target_name
from solar_edge.devices.server import RepoServer
from solar_edge.errors import PublishRefusedError, RepositoryError


@pytest.fixture()
def key():
    return Ed25519PrivateKey.generate()


def _updater(tmp_path, server, repo_dir):
    meta = tmp_path / "client"
    meta.mkdir(exist_ok=True)
    return Updater(str(meta), server.url + "/metadata/", str(tmp_path), server.url + "/targets/",
                   bootstrap=root_path(repo_dir).read_bytes())


def test_publish_writes_content_addressed_targets_and_signed_roles(tmp_path, key):
    repo_dir = tmp_path / "repo"
    repo = Repository(repo_dir, signer_from_key(key))
    p1 = make_test_packet(key, "sentiment", 1)
    p2 = make_test_packet(key, "sentiment", 2, pad=1000)
    names = repo.publish([p1, p2], facts_reader=double_facts)
    assert names == ["adapters/sentiment/v1.slr", "adapters/sentiment/v2.slr"]
    for data, name in ((p1, "v1.slr"), (p2, "v2.slr")):
        sha = hashlib.sha256(data).hexdigest()
        assert (repo_dir / "targets/adapters/sentiment" / f"{sha}.{name}").read_bytes() == data
    targets = Metadata.from_file(str(repo_dir / "metadata/1.targets.json"))
    info = targets.signed.targets["adapters/sentiment/v2.slr"]
    assert info.custom == {"adapter_id": "sentiment", "version": 2, "size": len(p2),
                           "fingerprint": "b" * 64, "rollout": "1"}
    assert info.length == len(p2)
    root = Metadata.from_file(str(repo_dir / "metadata/1.root.json"))
    assert root.signed.consistent_snapshot
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert root.signed.roles[role].threshold == 1


def test_ngclient_verifies_what_publish_wrote_and_sees_republish(tmp_path, key):
    repo_dir = tmp_path / "repo"
    repo = Repository(repo_dir, signer_from_key(key))
    repo.publish([make_test_packet(key, "a", 1)], facts_reader=double_facts)
    with RepoServer(repo_dir) as server:
        up = _updater(tmp_path, server, repo_dir)
        up.refresh()
        info = up.get_targetinfo("adapters/a/v1.slr")
        assert info is not None and up.get_targetinfo("adapters/a/v2.slr") is None
        path = up.download_target(info)
        assert open(path, "rb").read().startswith(b"TESTPKT1")
        repo.publish([make_test_packet(key, "a", 2)], facts_reader=double_facts)
        up2 = _updater(tmp_path, server, repo_dir)
        up2.refresh()
        assert up2.get_targetinfo("adapters/a/v2.slr").custom["version"] == 2
        assert up2.get_targetinfo("adapters/a/v1.slr") is not None   # added, not replaced
    ts = json.loads((repo_dir / "metadata/timestamp.json").read_text())
    assert ts["signed"]["version"] == 2


def test_replace_drops_previous_targets(tmp_path, key):
    repo = Repository(tmp_path / "repo", signer_from_key(key))
    repo.publish([make_test_packet(key, "a", 1), make_test_packet(key, "b", 1)],
                 facts_reader=double_facts)
    repo.publish([make_test_packet(key, "a", 3)], facts_reader=double_facts, replace=True)
    latest = Metadata.from_file(str(tmp_path / "repo/metadata/2.targets.json"))
    assert sorted(latest.signed.targets) == ["adapters/a/v3.slr"]


def test_expired_metadata_is_refused_by_the_client(tmp_path, key):
    repo_dir = tmp_path / "repo"
    Repository(repo_dir, signer_from_key(key)).publish(
        [make_test_packet(key, "a", 1)], facts_reader=double_facts,
        expiry=Expiry(timestamp=timedelta(seconds=-5)))
    with RepoServer(repo_dir) as server:
        with pytest.raises(tuf_exc.ExpiredMetadataError):
            _updater(tmp_path, server, repo_dir).refresh()


@pytest.mark.parametrize("adapter_id", ["../etc", "a/b", "", ".hidden", "x" * 65])
def test_unsafe_adapter_ids_are_refused(adapter_id):
    with pytest.raises(RepositoryError, match="safe path"):
        target_name(PacketFacts(adapter_id, 1, "b" * 64, 10, "0" * 64))


def test_ids_that_packets_allow_can_be_published():
    """One id rule for packets and the repository: a leading underscore is a valid id."""
    assert target_name(PacketFacts("_private-task.v2", 3, "b" * 64, 10, "0" * 64)) == \
        "adapters/_private-task.v2/v3.slr"


def _files(repo_dir):
    return sorted((p.relative_to(repo_dir).as_posix(), p.read_bytes())
                  for p in repo_dir.rglob("*") if p.is_file())


def test_publishing_other_bytes_as_a_published_version_is_refused(tmp_path, key):
    repo_dir = tmp_path / "repo"
    repo = Repository(repo_dir, signer_from_key(key))
    first = make_test_packet(key, "a", 1, scale=2.0)
    repo.publish([first], facts_reader=double_facts)
    before = _files(repo_dir)
    other = make_test_packet(key, "a", 1, scale=9.0)
    for replace in (False, True):
        with pytest.raises(PublishRefusedError, match="a v1 is already published with other"):
            repo.publish([make_test_packet(key, "b", 1), other], facts_reader=double_facts,
                         replace=replace)
    assert _files(repo_dir) == before   # nothing written, not even the valid "b"
    with pytest.raises(PublishRefusedError, match="two different packets claim b v1"):
        repo.publish([make_test_packet(key, "b", 1), make_test_packet(key, "b", 1, scale=3.0)],
                     facts_reader=double_facts)
    assert _files(repo_dir) == before


def test_same_bytes_again_is_idempotent_and_may_raise_the_rollout(tmp_path, key):
    repo_dir = tmp_path / "repo"
    repo = Repository(repo_dir, signer_from_key(key))
    packet = make_test_packet(key, "a", 1)
    repo.publish([packet], facts_reader=double_facts, rollout=0.1)
    repo.publish([packet], facts_reader=double_facts, rollout=0.5)
    latest = Metadata.from_file(str(repo_dir / "metadata/2.targets.json")).signed
    assert latest.targets["adapters/a/v1.slr"].custom["rollout"] == "0.5"
    assert Metadata.from_file(str(repo_dir / "metadata/1.targets.json")).signed \
        .targets["adapters/a/v1.slr"].custom["rollout"] == "0.1"


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), 1e-9, True])
def test_rollout_outside_zero_to_one_is_refused(tmp_path, key, fraction):
    with pytest.raises(RepositoryError, match="0 < f <= 1"):
        Repository(tmp_path / "repo", signer_from_key(key)).publish(
            [make_test_packet(key, "a", 1)], facts_reader=double_facts, rollout=fraction)
    assert not (tmp_path / "repo").exists()


def test_publishing_into_a_root_that_trusts_another_key_is_refused(tmp_path, key):
    repo_dir = tmp_path / "repo"
    Repository(repo_dir, signer_from_key(key)).publish([make_test_packet(key, "a", 1)],
                                                       facts_reader=double_facts)
    before = _files(repo_dir)
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(PublishRefusedError, match="does not trust this signing key for targets"):
        Repository(repo_dir, signer_from_key(stranger)).publish(
            [make_test_packet(stranger, "a", 2)], facts_reader=double_facts)
    assert _files(repo_dir) == before


def _real_packet(path, key, adapter_id, version, value):
    """A small real SOLAR packet (two vector records), signed with ``key``."""
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

    records = [LayerRecord(0, kind, 5, 1, 0, QuantizedValues(
        ValueFormat.FLOAT16, 5, raw=np.full(5, value, np.float16)))
        for kind in (RecordKind.BIAS_DELTA, RecordKind.MAGNITUDE_DELTA)]
    path.write_bytes(encode_packet(PacketHeader(bytes(32), adapter_id, version, {}),
                                   CodecHeader(0), records, key))
    return str(path)


def test_publish_command_refusals_exit_2_with_one_line(tmp_path, key, monkeypatch, capsys):
    from cli_main import run_main

    from solar_edge.format import signing

    def run(*args):
        return run_main(monkeypatch, capsys, "publish", *args)

    key_file = str(signing.save_private_key(key, tmp_path / "k.pem"))
    repo = str(tmp_path / "repo")
    first = _real_packet(tmp_path / "a1.slr", key, "a", 1, 1.0)
    code, out, _ = run(first, "--signing-key", key_file, "--out", repo, "--rollout", "0.25",
                       "--json")
    assert code == 0 and json.loads(out)["targets"] == ["adapters/a/v1.slr"]
    listed = Metadata.from_file(str(tmp_path / "repo/metadata/1.targets.json")).signed.targets
    assert listed["adapters/a/v1.slr"].custom["rollout"] == "0.25"
    assert run(first, "--signing-key", key_file, "--out", repo)[0] == 0   # same bytes: fine
    other = _real_packet(tmp_path / "a1b.slr", key, "a", 1, 2.0)
    code, _, err = run(other, "--signing-key", key_file, "--out", repo)
    assert code == 2 and err.startswith("error: PublishRefusedError: a v1 is already published")
    assert len(err.strip().splitlines()) == 1
    stranger = signing.generate_private_key()
    stranger_file = str(signing.save_private_key(stranger, tmp_path / "s.pem"))
    code, _, err = run(_real_packet(tmp_path / "a2.slr", stranger, "a", 2, 1.0),
                       "--signing-key", stranger_file, "--out", repo)
    assert code == 2 and "does not trust this signing key" in err
    code, _, err = run(first, "--signing-key", key_file, "--out", repo, "--rollout", "0")
    assert code == 2 and "0 < f <= 1" in err
