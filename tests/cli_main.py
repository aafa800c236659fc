"""Run ``solar-edge`` in-process as a user would (sys.argv + main), for command-line tests."""

from __future__ import annotations

import sys

from solar_edge.cli import main


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``solar-edge ARGS...``."""
    monkeypatch.setattr(sys, "argv", ["solar-edge", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
