"""``solar-edge device status|pin|unpin|switch|rollback --state DIR``: the operator's view of
the update agent's state folder on the board.

Every command reads and writes ``state.json`` the way the agent does (atomic replace), under
the state folder's one-writer lock (:mod:`solar_edge.devices.state_lock`): while the agent is
in an update cycle a command waits for it (``--wait``, default 60 s), then gives up with a
``StateError`` having changed nothing, so a cycle can never undo a command. The agent
reloads the state at the start of every cycle and on start-up, so a change takes effect at
the agent's next cycle or start.

* ``pin ID [VERSION]``: the agent installs no version of ID above VERSION (default: the
  installed one, i.e. hold ID where it is). ``unpin ID`` lifts that.
* ``switch ID``: ID (installed) serves after the agent's next start.
* ``rollback ID``: ID goes back to its previous version (the agent keeps one previous
  packet per id) and is pinned there, so the agent does not re-install the newer one
  until ``unpin ID``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from solar_edge.cli import options
from solar_edge.devices.state import MAX_VERSION, AgentState, StateStore
from solar_edge.errors import UnknownAdapterError
from solar_edge.format.ids import ID_RULE, is_valid_id


def status_doc(store: StateStore, state: AgentState) -> dict[str, Any]:
    """Installed ids with version, sha, active, pinned and previous; rejects; last cycle."""
    adapters = {}
    for key, inst in sorted(state.adapters.items()):
        prev = state.previous.get(key)
        adapters[key] = {"version": inst.version, "sha256": inst.sha256,
                         "active": key == state.active, "pinned": state.pinned.get(key),
                         "previous": None if prev is None else
                         {"version": prev.version, "sha256": prev.sha256}}
    last = store.read_status()
    reported = last.get("device_id") if last is not None else None  # the id the agent used
    return {"state": str(store.root),
            "device_id": reported if isinstance(reported, str) else store.device_id(False),
            "active": state.active, "adapters": adapters,
            "pinned": dict(sorted(state.pinned.items())),
            "rejected": dict(sorted(state.rejected.items())),
            "last_cycle": last}


def _installed(state: AgentState, adapter_id: str) -> None:
    if adapter_id not in state.adapters:
        have = ", ".join(sorted(state.adapters)) or "none"
        raise UnknownAdapterError(f"adapter {adapter_id!r:.80} is not installed "
                                  f"(installed: {have})")


def pin(state: AgentState, adapter_id: str, version: int | None) -> int:
    if not is_valid_id(adapter_id):
        raise UnknownAdapterError(f"{adapter_id!r:.80} is not an adapter id ({ID_RULE})")
    if version is None:
        _installed(state, adapter_id)
        version = state.adapters[adapter_id].version
    state.pinned[adapter_id] = version
    return version


def rollback(store: StateStore, state: AgentState, adapter_id: str) -> int:
    _installed(state, adapter_id)
    prev = state.previous.get(adapter_id)
    if prev is None:
        raise UnknownAdapterError(f"no previous version of {adapter_id} is kept on this device")
    store.read_packet(prev.sha256)  # re-hashed: never point the state at a damaged packet
    state.adapters[adapter_id] = prev
    del state.previous[adapter_id]
    state.pinned[adapter_id] = prev.version
    return prev.version


def _state_option() -> options.Decorator:
    return click.option("--state", "state_dir", required=True,
                        type=click.Path(file_okay=False, path_type=Path),
                        help="The agent's state folder (solar-edge agent --state).")


def _wait_option() -> options.Decorator:
    return click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=60.0,
                        show_default=True,
                        help="Seconds to wait while the agent is in an update cycle.")


@contextmanager
def _editing(state_dir: Path, wait_s: float) -> Iterator[tuple[StateStore, AgentState]]:
    """The agent's store and state, loaded and held under its lock for the block."""
    store = StateStore(state_dir, create=False)
    with store.locked(wait_s):
        yield store, store.load()


def _finish(store: StateStore, state: AgentState, message: str, as_json: bool) -> None:
    store.save(state)
    store.prune_packets(state)
    if as_json:
        options.emit_json(status_doc(store, state))
    else:
        click.echo(message)


@click.group("device")
def device() -> None:
    """List, pin, switch and roll back the adapters the update agent installed here."""


@device.command("status")
@_state_option()
@options.as_json()
def status(state_dir: Path, as_json: bool) -> None:
    """Installed adapters (version, sha256, active, pinned, previous), rejects, last cycle."""
    store = StateStore(state_dir, create=False)
    doc = status_doc(store, store.load())
    if as_json:
        options.emit_json(doc)
        return
    click.echo(f"device {doc['device_id'] or '(no id yet)'}  state {state_dir}")
    for key, row in doc["adapters"].items():
        flags = [f for f, on in (("active", row["active"]),
                                 (f"pinned<=v{row['pinned']}", row["pinned"] is not None),
                                 (f"previous v{(row['previous'] or {}).get('version')}",
                                  row["previous"] is not None)) if on]
        click.echo(f"  {key} v{row['version']} {row['sha256'][:16]} {' '.join(flags)}".rstrip())
    for key, version in doc["pinned"].items():
        if key not in doc["adapters"]:
            click.echo(f"  {key} (not installed) pinned<=v{version}")
    click.echo(f"rejected packets: {len(doc['rejected'])}")
    last = doc["last_cycle"]
    if last is None:
        click.echo("last cycle: none reported")
        return
    click.echo(f"last cycle: {last.get('time')} exit {last.get('exit_code')}"
               + (f" error {last['error']}" if last.get("error") else ""))
    for row in last.get("outcomes", []):
        click.echo(f"  {row.get('adapter_id')} v{row.get('version')}: {row.get('action')}"
                   + (f" ({row['error']})" if row.get("error") else ""))


@device.command("pin")
@click.argument("adapter_id")
@click.argument("version", required=False, type=click.IntRange(1, MAX_VERSION))
@_state_option()
@_wait_option()
@options.as_json()
def pin_cmd(adapter_id: str, version: int | None, state_dir: Path, wait_s: float,
            as_json: bool) -> None:
    """The agent installs no version of ADAPTER_ID above VERSION [default: the installed]."""
    with _editing(state_dir, wait_s) as (store, state):
        held = pin(state, adapter_id, version)
        _finish(store, state, f"{adapter_id} pinned at v{held} or lower", as_json)


@device.command("unpin")
@click.argument("adapter_id")
@_state_option()
@_wait_option()
@options.as_json()
def unpin_cmd(adapter_id: str, state_dir: Path, wait_s: float, as_json: bool) -> None:
    """The agent updates ADAPTER_ID again (to the newest version its rollout allows)."""
    with _editing(state_dir, wait_s) as (store, state):
        was = state.pinned.pop(adapter_id, None)
        _finish(store, state, f"{adapter_id} unpinned" if was is not None
                else f"{adapter_id} was not pinned", as_json)


@device.command("switch")
@click.argument("adapter_id")
@_state_option()
@_wait_option()
@options.as_json()
def switch_cmd(adapter_id: str, state_dir: Path, wait_s: float, as_json: bool) -> None:
    """ADAPTER_ID (installed) serves after the agent's next start."""
    with _editing(state_dir, wait_s) as (store, state):
        _installed(state, adapter_id)
        state.active = adapter_id
        _finish(store, state, f"{adapter_id} serves after the agent's next start", as_json)


@device.command("rollback")
@click.argument("adapter_id")
@_state_option()
@_wait_option()
@options.as_json()
def rollback_cmd(adapter_id: str, state_dir: Path, wait_s: float, as_json: bool) -> None:
    """ADAPTER_ID goes back to its previous version and is pinned there (until unpin)."""
    with _editing(state_dir, wait_s) as (store, state):
        newer = state.adapters.get(adapter_id)
        version = rollback(store, state, adapter_id)
        _finish(store, state, f"{adapter_id} rolled back from v"
                f"{newer.version if newer else '?'} to v{version} and pinned there "
                f"(solar-edge device unpin {adapter_id} to update again)", as_json)
