"""kill -9 during download and apply: the agent restarts into the old or the new adapter.

A real agent process (tests/ota_agent_proc.py) updates adapter ``a`` from v1 (model output
x * 2) to v2 (x * 3) over the real throttled server, and is SIGKILLed either at a named
phase of the state machine or at a random moment. A fresh agent then restores from disk:
the runtime must hold exactly the packet the committed state names, and the model must
answer as v1 or as v2, never anything else; one more cycle must end on v2.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from ota_rig import Rig

from solar_edge.profiles.links import LinkProfile

PROC = Path(__file__).with_name("ota_agent_proc.py")
OLD, NEW = [2.0], [3.0]
LINK = LinkProfile("kill-test", "tcp", rate_bps=1_500_000, latency_s=0.01, loss=0.0, mtu=1500)


@pytest.fixture()
def updating(tmp_path):
    """A device on v1, and v2 published (about 1 s to download through the throttle)."""
    rig = Rig(tmp_path, link=LINK)
    rig.publish(rig.packet("a", 1, scale=2.0, pad=150_000))
    rig.start()
    agent = rig.agent()
    assert [o.action for o in agent.run()] == ["installed"]
    new = rig.packet("a", 2, scale=3.0, pad=150_000)
    rig.publish(new)
    yield rig, new
    rig.server.stop()


def _spawn(rig: Rig, phase: str, nth: int = 1) -> subprocess.Popen:
    pub = rig.key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw).hex()
    root = rig.repo_dir / "metadata" / "1.root.json"
    return subprocess.Popen([sys.executable, str(PROC), str(rig.tmp / "device"), rig.server.url,
                             str(root), pub, phase, str(nth)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _check_restart(rig: Rig, new: bytes) -> list[float]:
    """Restore from disk; assert old-or-new, never a mix; then finish the update."""
    agent = rig.agent()
    state = agent.store.load()
    installed = state.adapters["a"]
    out = list(agent.applier.infer([1.0]))
    assert (installed.version, out) in ((1, OLD), (2, NEW)), (installed, out)
    assert agent.applier.active_version == installed.version
    assert agent.applier.staged == [installed.sha256]   # exactly the committed packet
    [outcome] = agent.run()
    assert outcome.action in ("installed", "current"), outcome
    assert list(agent.applier.infer([1.0])) == NEW
    assert agent.store.load().adapters["a"].sha256 == hashlib.sha256(new).hexdigest()
    return out


@pytest.mark.parametrize(("phase", "nth", "expected"), [
    ("refreshed", 1, OLD),
    ("downloading", 1, OLD),
    ("chunk", 3, OLD),
    ("chunk", 40, OLD),
    ("verified", 1, OLD),
    ("stored", 1, OLD),
    ("staged", 1, OLD),
    ("activated", 1, OLD),
    ("committed", 1, NEW),
])
def test_kill_at_each_phase(updating, phase, nth, expected):
    rig, new = updating
    proc = _spawn(rig, phase, nth)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    phases = (rig.tmp / "phases").read_text().split()
    assert phases.count(phase) >= nth
    assert _check_restart(rig, new) == expected
    if phase == "chunk":   # the second run resumed the partial download with a Range
        assert any(r and r != "bytes=0-" for _, r in rig.server.requests)


def test_kill_at_random_moments(updating):
    rig, new = updating
    rng = random.Random(20261128)
    seen = set()
    for _ in range(3):
        proc = _spawn(rig, "none")
        time.sleep(rng.uniform(0.6, 2.0))
        proc.kill()   # SIGKILL
        proc.communicate(timeout=30)
        out = _check_restart(rig, new)
        seen.add(tuple(out))
        # back to v1 for the next round: republish v1 on a fresh device folder
        rig.tmp = rig.tmp / "again"
        rig.tmp.mkdir()
        agent = rig.agent()
        assert agent.store.load().adapters == {}
        rig.publish(rig.packet("a", 1, scale=2.0, pad=150_000), replace=True)
        assert [o.action for o in agent.run()] == ["installed"]
        rig.publish(new, replace=True)
    assert seen <= {tuple(OLD), tuple(NEW)}
