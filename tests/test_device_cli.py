"""``solar-edge device status|pin|unpin|switch|rollback`` and the ``agent`` exit code, run
through the real console entry point against an agent state the loopback agent wrote."""

from __future__ import annotations

import hashlib
import json

import pytest
from cli_main import run_main


@pytest.fixture()
def device(rig):
    """A device with a v1, a v2 (a's previous is v1), b v1; v3 of a is published."""
    rig.publish(rig.packet("a", 1, scale=1.5), rig.packet("b", 1, scale=5.0))
    rig.start()
    rig.agent(device_id="board-9").run()
    rig.publish(rig.packet("a", 2, scale=2.0))
    rig.agent(device_id="board-9").run()
    rig.publish(rig.packet("a", 3, scale=3.0))
    return rig, str(rig.tmp / "device")


def test_status_lists_installed_adapters_pins_previous_and_the_last_cycle(device, monkeypatch,
                                                                          capsys):
    rig, state = device
    code, out, _ = run_main(monkeypatch, capsys, "device", "status", "--state", state, "--json")
    assert code == 0
    doc = json.loads(out)
    a = doc["adapters"]["a"]
    assert (a["version"], a["active"], a["pinned"], a["previous"]["version"]) == (2, True, None, 1)
    assert doc["adapters"]["b"]["active"] is False and doc["device_id"] == "board-9"
    assert doc["last_cycle"]["outcomes"][0] == {**doc["last_cycle"]["outcomes"][0],
                                                "adapter_id": "a", "action": "installed"}
    code, out, _ = run_main(monkeypatch, capsys, "device", "status", "--state", state)
    assert code == 0 and "a v2" in out and "previous v1" in out and "exit 0" in out


def test_rollback_goes_back_and_holds_until_unpin(device, monkeypatch, capsys):
    rig, state = device
    code, out, _ = run_main(monkeypatch, capsys, "device", "rollback", "a", "--state", state)
    assert code == 0 and "rolled back from v2 to v1" in out
    agent = rig.agent()                       # the next start serves the previous version
    assert agent.applier.active_version == 1 and list(agent.applier.infer([1.0])) == [1.5]
    outcomes = {o.adapter_id: (o.version, o.action) for o in agent.run()}
    assert outcomes["a"] == (3, "pinned") and agent.exit_code == 0
    assert agent.applier.active_version == 1
    code, _, err = run_main(monkeypatch, capsys, "device", "rollback", "a", "--state", state)
    assert code == 2 and "UnknownAdapterError: no previous version of a" in err
    run_main(monkeypatch, capsys, "device", "unpin", "a", "--state", state)
    outcomes = {o.adapter_id: (o.version, o.action) for o in agent.run()}   # same process
    assert outcomes["a"] == (3, "installed") and list(agent.applier.infer([1.0])) == [3.0]


def test_pin_with_a_version_caps_what_the_agent_installs(rig, monkeypatch, capsys):
    rig.publish(rig.packet("a", 1, scale=1.0))
    rig.start()
    rig.agent().run()
    state = str(rig.tmp / "device")
    code, out, _ = run_main(monkeypatch, capsys, "device", "pin", "a", "2", "--state", state,
                         "--json")
    assert code == 0 and json.loads(out)["pinned"] == {"a": 2}
    rig.publish(rig.packet("a", 2, scale=2.0), rig.packet("a", 3, scale=3.0))
    agent = rig.agent()
    assert [(o.version, o.action) for o in agent.run()] == [(2, "installed")]
    assert [(o.version, o.action) for o in agent.run()] == [(3, "pinned")]
    code, _, err = run_main(monkeypatch, capsys, "device", "pin", "ghost", "--state", state)
    assert code == 2 and "UnknownAdapterError: adapter 'ghost' is not installed" in err
    code, _, err = run_main(monkeypatch, capsys, "device", "pin", "a", "0", "--state", state)
    assert code == 2 and "0" in err


def test_switch_takes_effect_at_the_next_start_and_refuses_unknown_ids(device, monkeypatch,
                                                                       capsys):
    rig, state = device
    before = (rig.tmp / "device" / "state.json").read_bytes()
    code, _, err = run_main(monkeypatch, capsys, "device", "switch", "ghost", "--state", state)
    assert code == 2 and "UnknownAdapterError" in err and "installed: a, b" in err
    assert (rig.tmp / "device" / "state.json").read_bytes() == before
    code, out, _ = run_main(monkeypatch, capsys, "device", "switch", "b", "--state", state)
    assert code == 0 and "b serves after the agent's next start" in out
    agent = rig.agent()
    assert agent.applier.active == "b" and list(agent.applier.infer([1.0])) == [5.0]


def test_commands_on_a_folder_without_agent_state_are_typed_errors(tmp_path, monkeypatch,
                                                                   capsys):
    code, _, err = run_main(monkeypatch, capsys, "device", "status", "--state",
                         str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: StateError: no agent state at")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.json").write_text('{"format": 2, "adapters": {"../x": '
                                                 '{"version": 1, "sha256": "' + "a" * 64 +
                                                 '"}}, "active": null}')
    code, _, err = run_main(monkeypatch, capsys, "device", "status", "--state",
                         str(tmp_path / "bad"))
    assert code == 2 and "StateError" in err and "id rule" in err


def test_agent_command_exit_code_is_1_when_an_update_was_rejected(rig, monkeypatch, capsys,
                                                                  tmp_path):
    """The CLI around an agent on the in-memory runtime double (the real runtime's CLI run
    is in test_agent_runtime.py); a foreign-key packet is rejected -> exit 1."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from ota_doubles import InMemoryApplier, make_test_packet

    from solar_edge.devices import cli as devices_cli
    from solar_edge.format import signing

    forged = make_test_packet(Ed25519PrivateKey.generate(), "b", 1)
    rig.publish(rig.packet("a", 1), forged)
    rig.start()
    built = {}

    def build_with_double(server_url, bundle, device, state_dir, keys, root, retry,
                          device_id, report_url):
        agent = rig.agent(applier=InMemoryApplier(rig.key.public_key()), device_id=device_id)
        built["agent"] = agent
        return agent

    monkeypatch.setattr(devices_cli, "build_runtime_agent", build_with_double)
    pub = signing.save_public_key(rig.key, tmp_path / "key.pub")
    root = rig.repo_dir / "metadata" / "1.root.json"
    code, out, _ = run_main(monkeypatch, capsys, "agent", "--server", rig.server.url, "--bundle",
                         str(tmp_path), "--trusted-key", str(pub), "--root", str(root),
                         "--once", "--device-id", "board-3", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["exit_code"] == 1 and doc["device_id"] == "board-3"
    assert [(r["adapter_id"], r["action"]) for r in doc["outcomes"]] == [
        ("a", "installed"), ("b", "rejected")]
    assert hashlib.sha256(forged).hexdigest() in built["agent"].store.load().rejected
    code, _, err = run_main(monkeypatch, capsys, "agent", "--server", rig.server.url, "--bundle",
                         str(tmp_path), "--trusted-key", str(pub), "--once",
                         "--report-url", "ftp://x")
    assert code == 2 and "http:// or https://" in err


def test_a_running_agent_follows_an_operator_rollback_at_its_next_cycle(device, monkeypatch,
                                                                        capsys):
    rig, state = device
    agent = rig.agent()
    assert agent.applier.active_version == 2
    assert run_main(monkeypatch, capsys, "device", "rollback", "a", "--state", state)[0] == 0
    outcomes = {o.adapter_id: (o.version, o.action) for o in agent.run()}
    assert outcomes["a"] == (3, "pinned")
    assert agent.applier.active_version == 1 and list(agent.applier.infer([1.0])) == [1.5]
    assert run_main(monkeypatch, capsys, "device", "unpin", "a", "--state", state)[0] == 0
    outcomes = {o.adapter_id: (o.version, o.action) for o in agent.run()}
    assert outcomes["a"] == (3, "installed") and agent.applier.active_version == 3
    assert agent.store.load().previous["a"].version == 1


def test_status_of_an_agent_that_installed_nothing_yet(rig, monkeypatch, capsys):
    rig.publish(rig.packet("a", 1, fingerprint="c" * 64))     # for another base: rejected
    rig.start()
    rig.agent(device_id="board-0").run()
    code, out, _ = run_main(monkeypatch, capsys, "device", "status", "--state",
                         str(rig.tmp / "device"), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["adapters"] == {} and doc["device_id"] == "board-0"
    assert doc["last_cycle"]["exit_code"] == 1 and len(doc["rejected"]) == 1


def test_a_command_during_a_cycle_waits_for_it_or_changes_nothing(device, monkeypatch, capsys):
    """A pin issued while the agent's cycle runs (here: from the cycle's own 'refreshed'
    step) finds the state lock held, waits --wait seconds and changes nothing; the cycle
    installs v3 and does not overwrite a command with its stale copy of the state."""
    rig, state = device
    agent = rig.agent()
    tried: list[tuple[int, str, str]] = []
    agent.hook = lambda phase: tried.append(run_main(
        monkeypatch, capsys, "device", "pin", "a", "--wait", "0.2", "--state", state)) \
        if phase == "refreshed" else None
    outcomes = {o.adapter_id: (o.version, o.action) for o in agent.run()}
    code, _, err = tried[0]
    assert code == 2 and "StateError" in err and "in a cycle" in err and "--wait" in err
    assert outcomes["a"] == (3, "installed")
    assert "a" not in agent.store.load().pinned
    agent.hook = lambda phase: None
    assert run_main(monkeypatch, capsys, "device", "pin", "a", "--state", state)[0] == 0
    assert agent.store.load().pinned["a"] == 3


def test_a_cycle_waits_for_a_command_that_holds_the_lock(device):
    """The agent's cycle starts only after an operator command holding the lock is done, so
    it sees the pin written meanwhile (without the lock it would read the old state and
    install v3)."""
    import threading
    import time

    from solar_edge.devices.state import StateStore

    rig, state = device
    agent = rig.agent()
    holding = threading.Event()

    def operator() -> None:
        store = StateStore(state, create=False)
        with store.locked(1.0):
            holding.set()
            time.sleep(0.3)
            st = store.load()
            st.pinned["a"] = 2
            store.save(st)

    worker = threading.Thread(target=operator)
    worker.start()
    assert holding.wait(5)
    outcomes = {o.adapter_id: (o.version, o.action) for o in agent.run()}
    worker.join()
    assert outcomes["a"] == (3, "pinned") and agent.applier.active_version == 2
