"""Shared fixtures. Each area keeps its fixtures in its own module, imported here."""

from fixtures_adapters import *  # noqa: F401,F403
from fixtures_bundles import *  # noqa: F401,F403
from fixtures_ota import *  # noqa: F401,F403
