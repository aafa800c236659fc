"""The update agent with the real runtime: real MiniLM bundle, real codec packets, real
EdgeRuntime (onnxruntime), real server and client on loopback, real kill -9.

Outputs are compared with a reference runtime that applied the same packets directly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from ota_rig import Rig

from solar_edge.devices.applier import RuntimeApplier
from solar_edge.devices.packetinfo import read_facts
from solar_edge.errors import BaseMismatchError, RollbackError, SignatureError
from solar_edge.format import signing
from solar_edge.profiles.links import LinkProfile

pytestmark = pytest.mark.slow
PROC = Path(__file__).with_name("ota_agent_proc.py")
TEXTS = ["Open a file and return a stream.", "Edge boards receive signed adapter packets."]
LINK = LinkProfile("rt-kill", "tcp", rate_bps=400_000, latency_s=0.01, loss=0.0, mtu=1500)


def _packet(bundle, key, adapter_id, version, seed, fingerprint=None):
    from solar_edge.encode.solar import CodecConfig, encode
    from solar_edge.format.packet import PacketHeader
    from solar_edge.format.writer import encode_packet
    from solar_edge.methods.base import LayerUpdate

    rng = np.random.default_rng(seed)
    updates = {}
    for lid in range(0, len(bundle.layers), 6):
        out_f, in_f = bundle.layers[lid].shape
        updates[lid] = LayerUpdate(bundle.layers[lid].name,
                                   rng.standard_normal((out_f, 4)).astype(np.float32) * 0.05,
                                   rng.standard_normal((4, in_f)).astype(np.float32) * 0.05)
    result = encode(updates, {lid: bundle.layer_basis(lid) for lid in updates},
                    CodecConfig(seed=seed))
    header = PacketHeader(fingerprint or bundle.fingerprint, adapter_id, version,
                          {"task": adapter_id})
    return encode_packet(header, result.header, result.records, key)


@pytest.fixture(scope="module")
def world(minilm_bundle, tmp_path_factory):
    """Packets v1/v2 of one adapter, and the outputs a directly patched runtime gives."""
    from solar_edge.format.bundle import load_bundle
    from solar_edge.runtime.engine import EdgeRuntime

    bundle = load_bundle(minilm_bundle)
    key = signing.generate_private_key()
    v1 = _packet(bundle, key, "task-a", 1, seed=1)
    v2 = _packet(bundle, key, "task-a", 2, seed=2)
    ref = EdgeRuntime(str(minilm_bundle), [key.public_key()])
    outputs = {"base": ref.infer(TEXTS)}
    ref.apply(v1)
    outputs["v1"] = ref.infer(TEXTS)
    ref.apply(v2)
    outputs["v2"] = ref.infer(TEXTS)
    assert np.abs(outputs["v1"] - outputs["v2"]).max() > 1e-3
    return {"bundle_dir": minilm_bundle, "bundle": bundle, "key": key, "v1": v1, "v2": v2,
            "out": outputs}


def _applier(world):
    from solar_edge.runtime.engine import EdgeRuntime

    keys = [world["key"].public_key()]
    return RuntimeApplier(lambda: EdgeRuntime(str(world["bundle_dir"]), keys))


def _rig(tmp_path, world, link=None) -> Rig:
    return Rig(tmp_path, link=link, facts=read_facts, key=world["key"])


def _which(outputs, got) -> str:
    matches = [name for name, ref in outputs.items() if np.abs(ref - got).max() < 1e-5]
    assert len(matches) == 1, f"output matches {matches}: a mix or something else"
    return matches[0]


def test_agent_installs_real_packets_and_rejects_bad_ones(tmp_path, world):
    rig = _rig(tmp_path, world)
    other = signing.generate_private_key()
    foreign = _packet(world["bundle"], other, "task-f", 1, seed=5)
    wrong_base = _packet(world["bundle"], world["key"], "task-w", 1, seed=6,
                         fingerprint=b"\x00" * 32)
    rig.publish(world["v1"], wrong_base, foreign)  # TUF-valid listing, yet never trusted
    rig.start()
    try:
        agent = rig.agent(applier=_applier(world))
        outcomes = {o.adapter_id: o for o in agent.run()}
        assert outcomes["task-a"].action == "installed"
        assert isinstance(outcomes["task-f"].error, SignatureError)
        assert isinstance(outcomes["task-w"].error, BaseMismatchError)
        assert _which(world["out"], agent.applier.infer(TEXTS)) == "v1"
        rig.publish(world["v2"])
        assert {o.adapter_id: o.action for o in agent.run()}["task-a"] == "installed"
        assert _which(world["out"], agent.applier.infer(TEXTS)) == "v2"
        rig.publish(world["v1"], replace=True)
        [outcome] = agent.run()
        assert isinstance(outcome.error, RollbackError)
        restarted = rig.agent(applier=_applier(world))
        assert _which(world["out"], restarted.applier.infer(TEXTS)) == "v2"
    finally:
        rig.server.stop()


@pytest.mark.parametrize(("phase", "nth", "expected"), [
    ("chunk", 4, "v1"), ("staged", 1, "v1"), ("activated", 1, "v1"), ("committed", 1, "v2"),
])
def test_kill_9_with_the_real_runtime_restarts_into_old_or_new(tmp_path, world, phase, nth,
                                                               expected):
    rig = _rig(tmp_path, world, link=LINK)
    rig.publish(world["v1"])
    rig.start()
    try:
        rig.agent(applier=_applier(world)).run()
        rig.publish(world["v2"])
        pub = world["key"].public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw).hex()
        proc = subprocess.run(
            [sys.executable, str(PROC), str(rig.tmp / "device"), rig.server.url,
             str(rig.repo_dir / "metadata" / "1.root.json"), pub, phase, str(nth),
             str(world["bundle_dir"])], capture_output=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        agent = rig.agent(applier=_applier(world))
        assert _which(world["out"], agent.applier.infer(TEXTS)) == expected
        agent.run()
        assert _which(world["out"], agent.applier.infer(TEXTS)) == "v2"
    finally:
        rig.server.stop()


def test_publish_and_agent_commands_end_to_end(tmp_path, world):
    from solar_edge.devices.cli import agent as agent_cmd
    from solar_edge.devices.cli import publish as publish_cmd
    from solar_edge.devices.server import RepoServer

    key_file = signing.save_private_key(world["key"], tmp_path / "key.pem")
    pub_file = signing.save_public_key(world["key"], tmp_path / "key.pub")
    packet = tmp_path / "a1.slr"
    packet.write_bytes(world["v1"])
    repo = tmp_path / "repo"
    result = CliRunner().invoke(publish_cmd, [str(packet), "--key", str(key_file),
                                              "--out", str(repo)])
    assert result.exit_code == 0, result.output
    assert "adapters/task-a/v1.slr" in result.output
    with RepoServer(repo) as server:
        result = CliRunner().invoke(agent_cmd, [
            "--server", server.url, "--bundle", str(world["bundle_dir"]),
            "--trusted-key", str(pub_file), "--root", str(repo / "metadata/1.root.json"),
            "--state", str(tmp_path / "state"), "--once"])
    assert result.exit_code == 0, result.output
    assert "task-a v1: installed" in result.output
