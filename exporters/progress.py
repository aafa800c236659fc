"""Progress display for long export steps, on stderr; silent when disabled (``--quiet``).

On a terminal a bar is redrawn in place; otherwise (logs, CI) only one line per step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

T = TypeVar("T")
BAR = 28


class Progress:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        """``label ...`` then ``done (N.N s)`` around a block."""
        start = time.perf_counter()
        self._write(f"{label} ...\n")
        yield
        self._write(f"{label}: done ({time.perf_counter() - start:.1f} s)\n")

    def iterate(self, items: Iterable[T], total: int, label: str) -> Iterator[T]:
        """Yield ``items`` while showing ``label [####....] i/total``."""
        start = time.perf_counter()
        tty = self.enabled and self.stream.isatty()
        for i, item in enumerate(items):
            if tty:
                filled = BAR * i // max(total, 1)
                self._write(f"\r{label} [{'#' * filled}{'.' * (BAR - filled)}] {i}/{total}")
            yield item
        end = "\r" if tty else ""
        self._write(f"{end}{label} [{'#' * BAR}] {total}/{total} "
                    f"({time.perf_counter() - start:.1f} s)\n")
