"""Shared fixtures. Each area keeps its fixtures in its own module, imported here."""

from board_set import *  # noqa: F401,F403 (board-only skips and the `board` marker)
from fixtures_adapters import *  # noqa: F401,F403
from fixtures_bundles import *  # noqa: F401,F403
from fixtures_ota import *  # noqa: F401,F403
