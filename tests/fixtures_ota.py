"""OTA fixtures: a repository + loopback server rig (tests/ota_rig.py), stopped after each test."""

from __future__ import annotations

import pytest
from ota_rig import Rig

__all__ = ["rig"]


@pytest.fixture()
def rig(tmp_path):
    rig = Rig(tmp_path)
    yield rig
    if rig.server is not None:
        rig.server.stop()
