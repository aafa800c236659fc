"""Start-up recovery of the agent's folder: damaged stored packets and stale partial files.

A stored packet that no longer matches its hash (a flipped bit, a deleted file) must not
keep the agent from starting: :func:`heal_state` deletes the bad copy, falls back to the
adapter's kept previous packet (or to no adapter), commits that state and logs a warning;
the next cycle fetches the newer version again. :func:`clean_partials` deletes partial
downloads that can never be resumed usefully.
"""

from __future__ import annotations

import logging

from solar_edge.devices.state import AgentState, Installed, StateStore, is_sha256_hex
from solar_edge.errors import StateError

log = logging.getLogger("solar_edge.agent")


def intact(store: StateStore, adapter_id: str, inst: Installed) -> bool:
    """True if the stored packet matches its hash; a damaged copy is deleted (logged)."""
    try:
        store.read_packet(inst.sha256)
        return True
    except StateError as exc:
        log.warning("%s v%d: %s; dropping the stored copy (the next cycle fetches it again)",
                    adapter_id, inst.version, exc)
        store.packet_path(inst.sha256).unlink(missing_ok=True)
        return False


def heal_state(store: StateStore, state: AgentState) -> AgentState:
    """``state`` with each missing or damaged packet replaced by its kept previous one, or
    dropped (then nothing serves in its place); committed if anything changed."""
    healed = state.copy()
    for adapter_id, inst in sorted(state.adapters.items()):
        if intact(store, adapter_id, inst):
            continue
        prev = healed.previous.pop(adapter_id, None)
        if prev is not None and intact(store, adapter_id, prev):
            log.warning("%s: falling back to the previous v%d", adapter_id, prev.version)
            healed.adapters[adapter_id] = prev
            continue
        log.warning("%s: no intact packet left; it is no longer installed", adapter_id)
        del healed.adapters[adapter_id]
        if healed.active == adapter_id:
            healed.active = None
    for adapter_id, prev in sorted(healed.previous.items()):
        if not intact(store, adapter_id, prev):
            del healed.previous[adapter_id]
    if healed != state:
        store.save(healed)
    return healed


def clean_partials(store: StateStore) -> None:
    """Delete empty partial files, ones whose packet is already stored (a kill between
    commit and clean-up) and names that are not ``<sha256>.part``."""
    for part in store.partial.glob("*.part"):
        sha = part.name[:-len(".part")]
        if not is_sha256_hex(sha) or part.stat().st_size == 0 \
                or store.packet_path(sha).exists():
            part.unlink(missing_ok=True)
