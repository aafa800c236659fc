"""Publish packets as a TUF repository (python-tuf Metadata API).

Layout of ``REPO`` (consistent snapshots, so every file is immutable and can sit on any
HTTP server, object store or CDN)::

    metadata/1.root.json  N.targets.json  N.snapshot.json  timestamp.json
    targets/adapters/<adapter_id>/<sha256>.v<version>.slr

A target's name is ``adapters/<adapter_id>/v<version>.slr``; its ``custom`` info carries
``adapter_id``, ``version``, ``size`` and ``fingerprint`` (base bundle), read from the
packet itself, and ``rollout`` (the fraction of devices that may install it,
devices/rollout.py). Packets keep their own Ed25519 signature, so the same file can also travel
by USB or MQTT and still be checked on the device.

Keys: the four roles (root, targets, snapshot, timestamp) may share one Ed25519 key (the
demo does); production splits them and keeps root offline (docs/security.md).
Publishing again adds targets (or replaces them all with ``replace=True``) and re-signs
targets, snapshot and timestamp with higher versions. Root is renewed (version N+1, signed
by the root key, which devices accept through TUF's root rotation) when it would expire
within the targets lifetime; a signer that is not the root key is refused instead.

``rotate_key`` replaces the key of every role (a lost or retiring key): root N+1 is signed
by the old root key and the new one, and devices follow it by TUF's root rotation.

Refused, before anything is written (:class:`PublishRefusedError`): a published id+version
with other bytes (devices that installed it would never see the change; the same bytes
again are fine and may change the rollout fraction), and a repository whose root does not
trust the signing key for targets, snapshot and timestamp.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from solar_edge.devices.packetinfo import FactsReader, PacketFacts, read_facts
from solar_edge.devices.rollout import fraction_text
from solar_edge.devices.state import atomic_write, is_version
from solar_edge.errors import PublishRefusedError, RepositoryError
from solar_edge.format.ids import ID_RULE, is_valid_id

ROLES = ("root", "targets", "snapshot", "timestamp")


@dataclass(frozen=True)
class Expiry:
    """Lifetime of each role's metadata; short for timestamp (freeze attacks)."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=30)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    @classmethod
    def uniform(cls, lifetime: timedelta) -> Expiry:
        return cls(lifetime, lifetime, lifetime, lifetime)

    @classmethod
    def from_targets_days(cls, days: float, timestamp_hours: float | None = None) -> Expiry:
        """The command line's rule: targets ``days``, root 12x, snapshot 1/4, timestamp 1/30
        (or ``timestamp_hours``)."""
        life = timedelta(days=days)
        return cls(root=life * 12, targets=life, snapshot=life / 4,
                   timestamp=timedelta(hours=timestamp_hours) if timestamp_hours is not None
                   else life / 30)


def target_name(facts: PacketFacts) -> str:
    if not is_valid_id(facts.adapter_id):
        raise RepositoryError(f"adapter id {facts.adapter_id!r} is not a safe path component "
                              f"({ID_RULE})")
    if not is_version(facts.version):
        raise RepositoryError(f"version {facts.version!r} of {facts.adapter_id} is not in "
                              f"1..2^64-2")
    return f"adapters/{facts.adapter_id}/v{facts.version}.slr"


def signer_from_key(key: Ed25519PrivateKey) -> CryptoSigner:
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))


class Repository:
    """A TUF repository folder that one signer maintains (single key for all roles)."""

    def __init__(self, root_dir: str | Path, signer: Signer) -> None:
        self.dir = Path(root_dir)
        self.meta_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.signer = signer
        self.serializer = JSONSerializer(compact=False)

    def _now(self) -> datetime:
        return datetime.now(timezone.utc).replace(microsecond=0)

    def _write(self, md: Metadata, name: str) -> None:
        md.signatures.clear()
        md.sign(self.signer)
        atomic_write(self.meta_dir / name, md.to_bytes(self.serializer))

    def _latest(self, role: str) -> Metadata | None:
        versions = [int(p.name.split(".", 1)[0]) for p in self.meta_dir.glob(f"*.{role}.json")
                    if p.name.split(".", 1)[0].isdigit()]
        if not versions:
            return None
        return Metadata.from_file(str(self.meta_dir / f"{max(versions)}.{role}.json"))

    def init(self, expiry: Expiry) -> None:
        """Create root v1 trusting the signer's key for every role."""
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(expires=self._now() + expiry.root, consistent_snapshot=True)
        public = self.signer.public_key
        for role in ROLES:
            root.add_key(public, role)
        self._write(Metadata(root), "1.root.json")

    def check_signer(self) -> None:
        """PublishRefusedError unless the latest root trusts this signer for every role it signs."""
        root = self._latest("root")
        if root is None:
            return
        keyid = self.signer.public_key.keyid
        for role in ("targets", "snapshot", "timestamp"):
            trusted = root.signed.roles[role].keyids
            if keyid not in trusted:
                raise PublishRefusedError(
                    f"the repository's root does not trust this signing key for {role} "
                    f"(TUF key id {keyid[:16]}..., not the packet key id solar-edge keygen "
                    f"prints; root trusts TUF key ids "
                    f"{', '.join(k[:16] for k in trusted)}...)")

    def renew_root(self, expiry: Expiry) -> bool:
        """Sign root version N+1 if root N expires within ``expiry.targets``; True if done.

        PublishRefusedError if it must be renewed but this signer is not the root key."""
        latest = self._latest("root")
        if latest is None or latest.signed.expires > self._now() + expiry.targets:
            return False
        root = latest.signed
        if self.signer.public_key.keyid not in root.roles["root"].keyids:
            raise PublishRefusedError(
                f"root v{root.version} expires {root.expires:%Y-%m-%d %H:%M} UTC and this "
                f"signing key is not the root key: re-sign root with the root key first")
        root.version += 1
        root.expires = self._now() + expiry.root
        self._write(latest, f"{root.version}.root.json")
        return True

    def rotate_key(self, new_signer: Signer, expiry: Expiry = Expiry()) -> int:
        """Root N+1 trusting only ``new_signer`` for every role, signed by the current root
        key (which devices trust) and by the new key (TUF checks both); targets, snapshot
        and timestamp re-signed with the new key. Returns the new root version.

        PublishRefusedError if there is no repository, the signer is not the root key, or
        the new key is the current one. Packets keep their own signatures: the devices'
        trusted packet keys are not changed by this."""
        latest = self._latest("root")
        if latest is None:
            raise PublishRefusedError(f"{self.meta_dir} holds no root: nothing to rotate")
        root = latest.signed
        old_id, new_key = self.signer.public_key.keyid, new_signer.public_key
        if old_id not in root.roles["root"].keyids:
            raise PublishRefusedError(f"root v{root.version} does not trust this signing key "
                                      f"as its root key (TUF key id {old_id[:16]}...)")
        if new_key.keyid in root.roles["root"].keyids:
            raise PublishRefusedError("the new key is already the root key")
        for role in ROLES:
            root.add_key(new_key, role)
            for keyid in [k for k in root.roles[role].keyids if k != new_key.keyid]:
                root.revoke_key(keyid, role)
        root.version += 1
        root.expires = self._now() + expiry.root
        latest.signatures.clear()
        latest.sign(self.signer, append=True)
        latest.sign(new_signer, append=True)
        atomic_write(self.meta_dir / f"{root.version}.root.json", latest.to_bytes(self.serializer))
        self.signer = new_signer
        self.write_targets(self.targets(), expiry)
        return root.version

    def publish(self, packets: Iterable[bytes], expiry: Expiry = Expiry(),
                facts_reader: FactsReader = read_facts, replace: bool = False,
                rollout: float = 1.0) -> list[str]:
        """Add packets as targets and re-sign targets, snapshot, timestamp. Returns names."""
        fraction = fraction_text(rollout)
        self.check_signer()
        previous = self._latest("targets")
        published = dict(previous.signed.targets) if previous is not None else {}
        staged: dict[str, tuple[bytes, PacketFacts, str]] = {}
        for data in packets:   # check every packet before writing any file
            facts = facts_reader(data)
            name = target_name(facts)
            digest = hashlib.sha256(data).hexdigest()
            before = published.get(name)
            if before is not None and before.hashes.get("sha256") != digest:
                raise PublishRefusedError(
                    f"{facts.adapter_id} v{facts.version} is already published with other bytes "
                    f"(sha256 {before.hashes.get('sha256', '?')[:16]}...); publish a new version")
            if name in staged and staged[name][2] != digest:
                raise PublishRefusedError(f"two different packets claim {facts.adapter_id} "
                                          f"v{facts.version}")
            staged[name] = (data, facts, digest)
        if self._latest("root") is None:
            self.init(expiry)
        self.renew_root(expiry)
        targets = previous.signed if previous is not None else Targets()
        if replace:
            targets.targets.clear()
        for name, (data, facts, digest) in staged.items():
            store = self.targets_dir / Path(name).parent / f"{digest}.{Path(name).name}"
            store.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(store, data)
            info = TargetFile.from_data(name, data, ["sha256"])
            info.unrecognized_fields["custom"] = {
                "adapter_id": facts.adapter_id, "version": facts.version,
                "size": facts.size, "fingerprint": facts.fingerprint, "rollout": fraction,
            }
            targets.targets[name] = info
        self.write_targets(targets, expiry)
        return list(staged)

    def targets(self) -> Targets:
        """The latest signed targets (empty if nothing was published yet)."""
        latest = self._latest("targets")
        return latest.signed if latest is not None else Targets()

    def write_targets(self, targets: Targets, expiry: Expiry = Expiry()) -> None:
        """Sign ``targets`` as the next targets version, then snapshot and timestamp over it."""
        now = self._now()
        previous = self._latest("targets")
        targets.version = (previous.signed.version + 1) if previous is not None else 1
        targets.expires = now + expiry.targets
        self._write(Metadata(targets), f"{targets.version}.targets.json")

        prev_snap = self._latest("snapshot")
        snapshot = Snapshot(version=(prev_snap.signed.version + 1) if prev_snap else 1,
                            expires=now + expiry.snapshot)
        snapshot.meta["targets.json"] = MetaFile(version=targets.version)
        self._write(Metadata(snapshot), f"{snapshot.version}.snapshot.json")

        ts_path = self.meta_dir / "timestamp.json"
        ts_version = Metadata.from_file(str(ts_path)).signed.version + 1 if ts_path.exists() else 1
        timestamp = Timestamp(version=ts_version, expires=now + expiry.timestamp,
                              snapshot_meta=MetaFile(version=snapshot.version))
        self._write(Metadata(timestamp), "timestamp.json")


def publish(packet_paths: Sequence[str | Path], key: Ed25519PrivateKey, out: str | Path,
            expiry: Expiry = Expiry(), replace: bool = False,
            facts_reader: FactsReader = read_facts, rollout: float = 1.0) -> list[str]:
    """Publish packet files into the repository folder ``out`` (created if needed)."""
    data = [Path(p).read_bytes() for p in packet_paths]
    return Repository(out, signer_from_key(key)).publish(data, expiry, facts_reader, replace,
                                                         rollout)


def root_path(repo_dir: str | Path) -> Path:
    """The initial trusted root a device is provisioned with."""
    return Path(repo_dir) / "metadata" / "1.root.json"
