"""Subprocess body for the kill -9 tests: one agent cycle that SIGKILLs itself at a phase.

Usage: python ota_agent_proc.py STATE_DIR SERVER_URL ROOT_FILE PUBKEY_HEX PHASE NTH [BUNDLE]
Runs the agent with the in-memory runtime double, or with the real EdgeRuntime on BUNDLE
when given; when the agent reaches ``PHASE`` for the
``NTH`` time, the process sends itself SIGKILL (no cleanup, no finally blocks, no flush).
PHASE ``none`` runs to the end. Each phase reached is appended to STATE_DIR/../phases.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: E402
from ota_doubles import InMemoryApplier  # noqa: E402

from solar_edge.devices.agent import Agent, AgentConfig, RetryPolicy  # noqa: E402
from solar_edge.devices.fetcher import DownloadPolicy, HttpTransport  # noqa: E402


def main() -> None:
    state_dir, url, root, pub_hex, phase, nth = sys.argv[1:7]
    seen = {"n": 0}
    log = open(Path(state_dir).parent / "phases", "a", buffering=1)

    def hook(name: str) -> None:
        log.write(name + "\n")
        if name == phase:
            seen["n"] += 1
            if seen["n"] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)

    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex))
    if len(sys.argv) > 7:
        from solar_edge.devices.applier import RuntimeApplier
        from solar_edge.runtime.engine import EdgeRuntime

        bundle = sys.argv[7]
        applier = RuntimeApplier(lambda: EdgeRuntime(bundle, [public]))
    else:
        applier = InMemoryApplier(public)
    config = AgentConfig(url, Path(state_dir), trusted_root=Path(root).read_bytes(),
                         download=DownloadPolicy(backoff_s=0.05),
                         retry=RetryPolicy(attempts=3, base_s=0.05))
    agent = Agent(config, applier, HttpTransport(timeout_s=10), hook=hook)
    agent.start()
    agent.run()


if __name__ == "__main__":
    main()
