"""Crash-safe agent state: which packet serves each adapter id, and which one is active.

Every write goes to a temporary file in the same folder, is flushed and fsynced, renamed
over the old file with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the
rename itself survives a power cut. A reader therefore sees either the old or the new
file, never a mix. Packets are stored content-addressed (``packets/<sha256>.slr``) and
written the same way *before* the state that names them, so the state never points at a
missing or partial packet.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from solar_edge.errors import StateError

STATE_FORMAT = 1
MAX_STATE_BYTES = 1 << 20


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


@dataclass
class AgentState:
    adapters: dict[str, Installed] = field(default_factory=dict)
    active: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # packet sha256 -> reason

    def to_bytes(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "adapters": {k: {"version": v.version, "sha256": v.sha256}
                         for k, v in sorted(self.adapters.items())},
            "active": self.active,
            "rejected": dict(sorted(self.rejected.items())),
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentState:
        try:
            doc = json.loads(data)
            if doc.get("format") != STATE_FORMAT:
                raise StateError(f"unsupported state format {doc.get('format')!r}")
            adapters = {str(k): Installed(int(v["version"]), str(v["sha256"]))
                        for k, v in doc["adapters"].items()}
            active = doc["active"]
            rejected = {str(k): str(v) for k, v in doc.get("rejected", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(f"agent state is malformed: {exc}") from exc
        if active is not None and active not in adapters:
            raise StateError(f"active adapter {active!r} is not installed")
        return cls(adapters, active, rejected)


class StateStore:
    """The agent's folder: ``state.json``, ``packets/``, ``partial/``, ``metadata/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.packets = self.root / "packets"
        self.partial = self.root / "partial"
        self.metadata = self.root / "metadata"
        for folder in (self.root, self.packets, self.partial, self.metadata):
            folder.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "state.json"

    def load(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        if self.path.stat().st_size > MAX_STATE_BYTES:
            raise StateError(f"{self.path} is larger than {MAX_STATE_BYTES} bytes")
        return AgentState.from_bytes(self.path.read_bytes())

    def save(self, state: AgentState) -> None:
        atomic_write(self.path, state.to_bytes())

    def packet_path(self, sha256: str) -> Path:
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
        """Delete stored packets no installed adapter refers to."""
        keep = {f"{v.sha256}.slr" for v in state.adapters.values()}
        for path in self.packets.glob("*.slr"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
