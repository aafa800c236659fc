"""publish keeps root alive (renewal that devices accept by TUF root rotation) and refuses
lifetimes that would write broken metadata."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_doubles import double_facts, make_test_packet
from tuf.api.metadata import Metadata

from solar_edge.devices.repo import Expiry, Repository, signer_from_key
from solar_edge.errors import PublishRefusedError


def _root_versions(repo_dir) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in (repo_dir / "metadata").glob("*.root.json"))


def test_publish_renews_an_expiring_root_and_the_agent_follows_the_rotation(rig):
    rig.repo.init(Expiry(root=timedelta(seconds=-60)))    # root v1 already expired
    rig.publish(rig.packet("a", 1))
    assert _root_versions(rig.repo_dir) == [1, 2]
    renewed = Metadata.from_file(str(rig.repo_dir / "metadata/2.root.json")).signed
    assert renewed.version == 2 and not renewed.is_expired()
    rig.start()
    agent = rig.agent()     # provisioned with the expired 1.root.json
    assert [(o.adapter_id, o.action) for o in agent.run()] == [("a", "installed")]
    rig.publish(rig.packet("a", 2))                       # root is fresh: no new version
    assert _root_versions(rig.repo_dir) == [1, 2]


def test_renewing_root_with_a_key_that_is_not_root_is_refused(tmp_path):
    key, online = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    repo = Repository(tmp_path / "repo", signer_from_key(key))
    repo.init(Expiry(root=timedelta(days=2)))
    path = tmp_path / "repo/metadata/1.root.json"
    root = Metadata.from_file(str(path))
    public = signer_from_key(online).public_key
    for role in ("targets", "snapshot", "timestamp"):
        root.signed.revoke_key(signer_from_key(key).public_key.keyid, role)
        root.signed.add_key(public, role)
    repo._write(root, "1.root.json")
    with pytest.raises(PublishRefusedError, match="not the root key"):
        Repository(tmp_path / "repo", signer_from_key(online)).publish(
            [make_test_packet(online, "a", 1)], facts_reader=double_facts)
    assert not list((tmp_path / "repo/targets").rglob("*.slr"))


@pytest.mark.parametrize("args", [
    ("--expires-days", "nan"), ("--expires-days", "inf"), ("--expires-days", "1e9"),
    ("--expires-days", "-1"), ("--expires-days", "0"), ("--timestamp-hours", "nan"),
    ("--timestamp-hours", "-5"), ("--timestamp-hours", "0")])
def test_publish_refuses_bad_lifetimes_with_one_line(tmp_path, monkeypatch, capsys, args):
    from cli_main import run_main

    from solar_edge.format import signing

    key_file = str(signing.save_private_key(signing.generate_private_key(), tmp_path / "k.pem"))
    packet = tmp_path / "p.slr"
    packet.write_bytes(b"not read: the options are checked first")
    code, out, err = run_main(monkeypatch, capsys, "publish", str(packet), "--signing-key",
                              key_file, "--out", str(tmp_path / "repo"), *args)
    assert code == 2 and "Traceback" not in err and "finite number" in err
    assert not (tmp_path / "repo").exists()


def test_a_refused_signer_is_named_by_its_tuf_key_id(tmp_path):
    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    Repository(tmp_path / "repo", signer_from_key(key)).publish(
        [make_test_packet(key, "a", 1)], facts_reader=double_facts)
    tuf_id = signer_from_key(stranger).public_key.keyid
    with pytest.raises(PublishRefusedError, match=f"TUF key id {tuf_id[:16]}.*not the packet key"):
        Repository(tmp_path / "repo", signer_from_key(stranger)).publish(
            [make_test_packet(stranger, "a", 2)], facts_reader=double_facts)
