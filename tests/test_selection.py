"""Version selection per adapter id (devices/selection.py), without a repository."""

from __future__ import annotations

import pytest

from solar_edge.devices.packetinfo import ListedTarget
from solar_edge.devices.selection import select_versions
from solar_edge.errors import RollbackError


def _listed(*versions: int, rollout: float = 1.0) -> list[ListedTarget]:
    return [ListedTarget(f"adapters/a/v{v}.slr", "a", v, f"{v:064x}", 10, rollout)
            for v in versions]


@pytest.mark.parametrize("listed, have, pin, tried, decided", [
    (_listed(1, 2, 3), 0, None, [3, 2, 1], []),            # newest first, fall back older
    (_listed(1, 2, 3), 2, None, [3], []),                  # only above the installed one
    (_listed(1, 2, 3), 1, 2, [2], []),                     # a pin caps what is tried
    (_listed(1, 2, 3), 2, 2, [], [("pinned", 3)]),
    (_listed(2), 2, None, [], [("current", 2)]),
    (_listed(1, 2, rollout=1e-6), 0, None, [], [("deferred", 2)]),   # rollout excludes it
])
def test_versions_tried_and_outcomes_decided_without_a_download(listed, have, pin, tried,
                                                                decided):
    candidates, outcomes = select_versions("a", listed, have, pin, "dev-0000000000000000")
    assert [t.version for t in candidates] == tried
    assert [(o.action, o.version) for o in outcomes] == decided


def test_a_repository_older_than_the_device_is_a_rollback():
    candidates, outcomes = select_versions("a", _listed(1, 2), 3, None, "dev-1")
    assert candidates == [] and outcomes[0].action == "rejected"
    assert isinstance(outcomes[0].error, RollbackError)
