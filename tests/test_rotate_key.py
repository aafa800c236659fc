"""rotate-key: every TUF role moves to a new key; devices provisioned with the first root
follow the rotation, the old key can no longer publish, and a non-root key cannot rotate."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_doubles import double_facts, make_test_packet
from tuf.api.metadata import Metadata

from solar_edge.devices.repo import Repository, signer_from_key
from solar_edge.errors import PublishRefusedError


def test_after_a_rotation_devices_install_what_the_new_key_publishes(rig):
    rig.publish(rig.packet("a", 1))
    rig.start()
    agent = rig.agent()                      # provisioned with 1.root.json
    assert [(o.adapter_id, o.action) for o in agent.run()] == [("a", "installed")]
    new = Ed25519PrivateKey.generate()
    assert rig.repo.rotate_key(signer_from_key(new)) == 2
    root = Metadata.from_file(str(rig.repo_dir / "metadata/2.root.json"))
    new_id = signer_from_key(new).public_key.keyid
    assert all(r.keyids == [new_id] for r in root.signed.roles.values())
    assert len(root.signatures) == 2         # the old root key and the new one
    Repository(rig.repo_dir, signer_from_key(new)).publish(
        [make_test_packet(rig.key, "a", 2)], facts_reader=double_facts)
    assert [(o.adapter_id, o.action) for o in agent.run()] == [("a", "installed")]
    assert agent.state.adapters["a"].version == 2
    fresh = rig.agent(state_dir=rig.tmp / "fresh")   # a device provisioned before the rotation
    assert sorted(o.action for o in fresh.run()) == ["installed"]
    with pytest.raises(PublishRefusedError, match="does not trust this signing key"):
        Repository(rig.repo_dir, signer_from_key(rig.key)).publish(
            [rig.packet("a", 3)], facts_reader=double_facts)


def test_only_the_root_key_rotates_and_never_to_itself(tmp_path):
    key = Ed25519PrivateKey.generate()
    repo = Repository(tmp_path / "repo", signer_from_key(key))
    with pytest.raises(PublishRefusedError, match="holds no root"):
        repo.rotate_key(signer_from_key(Ed25519PrivateKey.generate()))
    repo.publish([make_test_packet(key, "a", 1)], facts_reader=double_facts)
    with pytest.raises(PublishRefusedError, match="already the root key"):
        repo.rotate_key(signer_from_key(key))
    stranger = Repository(tmp_path / "repo", signer_from_key(Ed25519PrivateKey.generate()))
    with pytest.raises(PublishRefusedError, match="does not trust this signing key as its root"):
        stranger.rotate_key(signer_from_key(Ed25519PrivateKey.generate()))
    assert sorted(p.name for p in (tmp_path / "repo/metadata").glob("*.root.json")) == [
        "1.root.json"]


def test_the_command_rotates_and_later_publishes_need_the_new_key(tmp_path, monkeypatch,
                                                                   capsys):
    from cli_main import run_main

    from solar_edge.format import signing

    old, new = (signing.save_private_key(signing.generate_private_key(), tmp_path / f"{n}.key")
                for n in ("old", "new"))
    repo = tmp_path / "repo"
    Repository(repo, signer_from_key(signing.load_private_key(old))).publish(
        [make_test_packet(signing.load_private_key(old), "a", 1)], facts_reader=double_facts)
    code, out, err = run_main(monkeypatch, capsys, "rotate-key", str(repo), "--signing-key",
                              str(old), "--new-key", str(new), "--json")
    assert code == 0 and '"root_version": 2' in out, err
    code, out, err = run_main(monkeypatch, capsys, "rotate-key", str(repo), "--signing-key",
                              str(old), "--new-key", str(new))
    assert code == 2 and len(err.splitlines()) == 1 and "PublishRefusedError" in err
