"""A loopback OTA test rig: a TUF repository folder, its publisher, a server, device agents.

Shared by the agent tests; the runtime is the in-memory double unless one is passed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_doubles import InMemoryApplier, double_facts, make_test_packet

from solar_edge.devices.agent import Agent, AgentConfig, RetryPolicy
from solar_edge.devices.fetcher import DownloadPolicy, HttpTransport
from solar_edge.devices.packetinfo import FactsReader
from solar_edge.devices.repo import Repository, root_path, signer_from_key
from solar_edge.devices.server import RepoServer
from solar_edge.profiles.links import LinkProfile


class Rig:
    """A repository folder, its publisher, a loopback server and agents for one device."""

    def __init__(self, tmp: Path, link: LinkProfile | None = None,
                 facts: FactsReader = double_facts,
                 key: Ed25519PrivateKey | None = None) -> None:
        self.facts = facts
        self.tmp = tmp
        self.key = key or Ed25519PrivateKey.generate()
        self.repo_dir = tmp / "repo"
        self.repo = Repository(self.repo_dir, signer_from_key(self.key))
        self.link = link
        self.server: RepoServer | None = None
        self.sleeps: list[float] = []

    def publish(self, *packets: bytes, **kw) -> None:
        self.repo.publish(list(packets), facts_reader=self.facts, **kw)

    def packet(self, adapter_id: str, version: int, **kw) -> bytes:
        return make_test_packet(self.key, adapter_id, version, **kw)

    def start(self, port: int = 0) -> RepoServer:
        self.server = RepoServer(self.repo_dir, port=port, link=self.link).start()
        return self.server

    def agent(self, applier=None, transport=None, url=None, sleep=None, state_dir=None,
              **cfg) -> Agent:
        applier = applier or InMemoryApplier(self.key.public_key())
        config = AgentConfig(url or self.server.url, state_dir or self.tmp / "device",
                             trusted_root=root_path(self.repo_dir).read_bytes(),
                             download=cfg.pop("download", DownloadPolicy(backoff_s=0.01)),
                             retry=cfg.pop("retry", RetryPolicy(base_s=0.01)), **cfg)
        agent = Agent(config, applier, transport or HttpTransport(timeout_s=5),
                      sleep=sleep or self.sleeps.append)
        agent.start()
        return agent

    def target_file(self, data: bytes, adapter_id: str, version: int) -> Path:
        sha = hashlib.sha256(data).hexdigest()
        return self.repo_dir / "targets" / "adapters" / adapter_id / f"{sha}.v{version}.slr"
