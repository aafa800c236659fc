"""One writer of an agent's state folder at a time: the agent's update cycle or an operator
command (``solar-edge device pin|unpin|switch|rollback``).

Both read ``state.json``, change it and write it back; without a lock, a cycle that commits
an install while an operator pins or rolls back writes its own copy and silently undoes the
command. The lock is an exclusive ``flock`` on ``<state>/state.lock`` (Linux, the boards'
OS): the kernel drops it when its holder exits or is killed, so a crash never leaves a stale
lock. The agent holds it for each cycle attempt (not while it sleeps between cycles or
backs off); an operator command waits for it up to ``wait_s`` seconds, then gives up with a
:class:`~solar_edge.errors.StateError`, having changed nothing.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from solar_edge.errors import StateError

LOCK_NAME = "state.lock"
POLL_S = 0.05


@contextmanager
def state_lock(root: str | Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold ``root``'s lock for the block; ``wait_s`` None waits as long as it takes."""
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open the state lock {path}: {exc.strerror}") from exc
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            _acquire_within(fd, root, wait_s)
        yield
    finally:
        os.close(fd)  # releases the lock


def _acquire_within(fd: int, root: str | Path, wait_s: float) -> None:
    deadline = time.monotonic() + max(wait_s, 0.0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StateError(f"{root}: the update agent is in a cycle (it holds "
                                 f"{LOCK_NAME}; waited {wait_s:g} s); nothing changed: try "
                                 f"again, or wait longer with --wait SECONDS") from None
            time.sleep(POLL_S)
