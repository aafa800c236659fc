"""Crash-safe agent state: which packet serves each adapter id, and which one is active.

Every write goes to a temporary file in the same folder, is flushed and fsynced, renamed
over the old file with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the
rename itself survives a power cut. A reader therefore sees either the old or the new
file, never a mix. Packets are stored content-addressed (``packets/<sha256>.slr``) and
written the same way *before* the state that names them, so the state never points at a
missing or partial packet.

Format 2 adds, per adapter id, the one previous packet kept for ``solar-edge device rollback``
and the operator's pins; format 1 files (no ``previous``, no ``pinned``) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solar_edge.devices.state_lock import state_lock
from solar_edge.errors import StateError
from solar_edge.format.ids import ID_RULE, MAX_ID_BYTES, is_valid_id

STATE_FORMAT = 2
READABLE_FORMATS = (1, 2)
MAX_STATE_BYTES = 1 << 20
MAX_VERSION = 2**64 - 2
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(text: object) -> bool:
    """True for 64 lowercase hex digits: the only hash text that may become a file name."""
    return isinstance(text, str) and _SHA256.fullmatch(text) is not None


def is_version(value: object) -> bool:
    """True for an adapter version a packet can carry (1..2^64-2; not a bool)."""
    return type(value) is int and 1 <= value <= MAX_VERSION


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Installed:
    """One adapter as installed on the device."""

    version: int
    sha256: str


def _installed(key: str, doc: Any) -> Installed:
    if not is_valid_id(key):
        raise StateError(f"adapter id {key!r} in the state does not follow the id rule ({ID_RULE})")
    if not isinstance(doc, dict) or not is_version(doc.get("version")) \
            or not is_sha256_hex(doc.get("sha256")):
        raise StateError(f"agent state is malformed: adapter {key!r} needs an integer version "
                         f"and a 64-hex-digit sha256, got {doc!r:.120}")
    return Installed(doc["version"], doc["sha256"])


@dataclass
class AgentState:
    """What is committed on the device.

    ``previous``: per id, the packet that was installed before the current one (kept so an
    operator can roll back; older ones are pruned). ``pinned``: per id, the highest version
    the agent may install (an operator's pin; ``solar-edge device pin``)."""

    adapters: dict[str, Installed] = field(default_factory=dict)
    active: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # packet sha256 -> reason
    previous: dict[str, Installed] = field(default_factory=dict)
    pinned: dict[str, int] = field(default_factory=dict)

    def copy(self) -> AgentState:
        return AgentState(dict(self.adapters), self.active, dict(self.rejected),
                          dict(self.previous), dict(self.pinned))

    def to_bytes(self) -> bytes:
        def table(items: dict[str, Installed]) -> dict[str, dict[str, Any]]:
            return {k: {"version": v.version, "sha256": v.sha256} for k, v in sorted(items.items())}

        doc = {
            "format": STATE_FORMAT,
            "adapters": table(self.adapters),
            "active": self.active,
            "rejected": dict(sorted(self.rejected.items())),
            "previous": table(self.previous),
            "pinned": dict(sorted(self.pinned.items())),
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentState:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") not in READABLE_FORMATS:
                got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
                raise StateError(f"unsupported state format {got!r}")
            adapters = {k: _installed(k, v) for k, v in doc["adapters"].items()}
            previous = {k: _installed(k, v) for k, v in doc.get("previous", {}).items()}
            active = doc["active"]
            rejected = {str(k): str(v) for k, v in doc.get("rejected", {}).items()}
            pinned = dict(doc.get("pinned", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(f"agent state is malformed: {exc}") from exc
        if active is not None and active not in adapters:
            raise StateError(f"active adapter {active!r} is not installed")
        for key, version in pinned.items():
            if not is_valid_id(key) or not is_version(version):
                raise StateError(f"agent state is malformed: pin {key!r}: {version!r}")
        return cls(adapters, active, rejected, previous, pinned)


class StateStore:
    """The agent's folder: ``state.json``, ``status.json``, ``device_id``, ``packets/``,
    ``partial/``, ``metadata/``. ``create=False`` (operator commands) requires an existing one."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = Path(root)
        self.packets = self.root / "packets"
        self.partial = self.root / "partial"
        self.metadata = self.root / "metadata"
        self.path = self.root / "state.json"
        self.status_path = self.root / "status.json"
        self.device_id_path = self.root / "device_id"
        if not create:
            marks = (self.path, self.status_path, self.device_id_path)
            if not any(mark.is_file() for mark in marks):
                raise StateError(f"no agent state at {self.root} (no state.json, status.json "
                                 f"or device_id)")
            return
        for folder in (self.root, self.packets, self.partial, self.metadata):
            folder.mkdir(parents=True, exist_ok=True)

    def device_id(self, generate: bool = True) -> str | None:
        """The id stored in the folder; a random one is generated and stored on first use."""
        if self.device_id_path.exists():
            text = self.device_id_path.read_bytes()[:MAX_ID_BYTES + 2].decode("ascii", "replace")
            if not is_valid_id(text.strip()):
                raise StateError(f"{self.device_id_path} does not hold a valid id ({ID_RULE})")
            return text.strip()
        if not generate:
            return None
        device_id = f"dev-{secrets.token_hex(8)}"
        atomic_write(self.device_id_path, device_id.encode() + b"\n")
        return device_id

    def write_status(self, doc: dict[str, Any]) -> None:
        atomic_write(self.status_path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def read_status(self) -> dict[str, Any] | None:
        """The last cycle's report, or None if none was written or it cannot be read."""
        try:
            if self.status_path.stat().st_size > MAX_STATE_BYTES:
                return None
            doc = json.loads(self.status_path.read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def load(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        if self.path.stat().st_size > MAX_STATE_BYTES:
            raise StateError(f"{self.path} is larger than {MAX_STATE_BYTES} bytes")
        return AgentState.from_bytes(self.path.read_bytes())

    def save(self, state: AgentState) -> None:
        atomic_write(self.path, state.to_bytes())

    def locked(self, wait_s: float | None = None) -> AbstractContextManager[None]:
        """The folder's one-writer lock (:mod:`solar_edge.devices.state_lock`)."""
        return state_lock(self.root, wait_s)

    def packet_path(self, sha256: str) -> Path:
        if not is_sha256_hex(sha256):  # the last guard before a hash becomes a file name
            raise StateError(f"not a sha256 hex digest: {sha256!r:.80}")
        return self.packets / f"{sha256}.slr"

    def store_packet(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.packet_path(sha)
        if not path.exists():
            atomic_write(path, data)
        return sha

    def read_packet(self, sha256: str) -> bytes:
        """The stored packet bytes, re-hashed: a damaged file is an error, not an input."""
        path = self.packet_path(sha256)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"stored packet {sha256} is missing: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StateError(f"stored packet {path} does not match its hash")
        return data

    def prune_packets(self, state: AgentState) -> None:
        """Delete stored packets neither an installed nor a kept previous adapter refers to."""
        keep = {f"{v.sha256}.slr" for v in [*state.adapters.values(), *state.previous.values()]}
        for path in self.packets.glob("*.slr"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
