"""Which listed versions of one adapter a device tries, newest first (pure logic).

Per adapter id: the versions above the installed one that the operator's pin allows and whose
staged rollout includes this device (devices/rollout.py); a newer version that waits for its
rollout is reported ``deferred``; a repository whose newest version is older than the
installed one is a rollback (``rejected``)."""

from __future__ import annotations

from solar_edge.devices.packetinfo import ListedTarget
from solar_edge.devices.report import Outcome
from solar_edge.devices.rollout import eligible
from solar_edge.errors import RollbackError


def select_versions(adapter_id: str, listed: list[ListedTarget], have: int, pin: int | None,
                    device_id: str) -> tuple[list[ListedTarget], list[Outcome]]:
    """The versions to try, newest first, and the outcomes decided without a download.

    ``have``: the installed version (0: none); ``pin``: the highest version allowed, if any."""
    newest = max(t.version for t in listed)
    if newest < have:
        err = RollbackError(f"repository offers v{newest}, device has v{have}",
                            field="header.adapter_version")
        return [], [Outcome(adapter_id, newest, "rejected", err)]
    allowed = [t for t in listed if t.version > have and (pin is None or t.version <= pin)]
    ready = sorted((t for t in allowed if eligible(device_id, adapter_id, t.version, t.rollout)),
                   key=lambda t: t.version, reverse=True)
    top = max((t.version for t in allowed), default=0)
    if ready and top > ready[0].version:
        return ready, [Outcome(adapter_id, top, "deferred")]
    if ready:
        return ready, []
    if allowed:
        return [], [Outcome(adapter_id, top, "deferred")]
    if newest > have:
        return [], [Outcome(adapter_id, newest, "pinned")]
    return [], [Outcome(adapter_id, have, "current")]
