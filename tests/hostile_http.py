"""A hostile HTTP server on loopback: raw sockets, behaviour scripted per path.

Each request's path is looked up in ``scripts``; a script is a list of steps run in
order on the raw connection (exact bytes, trickles, resets, hangs, endless streams).
Paths without a script are served honestly from ``root`` (200, or 206 for a Range), so
a whole TUF repository can be served with one file made hostile. ``requests`` logs
``(path, range header)``. ``stop()`` closes every connection and joins every thread.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Send:
    """Send these exact bytes."""

    data: bytes


@dataclass(frozen=True)
class Trickle:
    """Send ``data`` ``size`` bytes at a time, one piece every ``every_s`` seconds."""

    data: bytes
    every_s: float
    size: int = 1


@dataclass(frozen=True)
class Endless:
    """Send ``data`` again and again (every ``every_s`` seconds) until the client goes."""

    data: bytes
    every_s: float = 0.0


@dataclass(frozen=True)
class Reset:
    """Abort the connection with a TCP RST (SO_LINGER with a zero timeout)."""


@dataclass(frozen=True)
class Hang:
    """Keep the connection open and send nothing until the server stops."""


Step = Send | Trickle | Endless | Reset | Hang


def response(status: str, headers: list[tuple[str, str]] | list[tuple[bytes, bytes]],
             body: bytes = b"") -> bytes:
    """Raw bytes of an HTTP/1.1 response; header names and values go out as given."""
    lines = [status.encode("latin-1")]
    for name, value in headers:
        n = name if isinstance(name, bytes) else name.encode("latin-1")
        v = value if isinstance(value, bytes) else value.encode("utf-8")
        lines.append(n + b": " + v)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class HostileServer:
    root: Path | None = None
    scripts: dict[str, list[Step]] = field(default_factory=dict)
    times: dict[str, int | None] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def script(self, path: str, *steps: Step, times: int | None = None) -> None:
        """Answer ``path`` with ``steps``: always, or for the next ``times`` requests only."""
        with self._lock:
            self.scripts[path] = list(steps)
            self.times[path] = times

    def start(self) -> HostileServer:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            _close_quietly(sock)
        for thread in list(self._threads):
            thread.join(timeout=5)
        alive = [t for t in self._threads if t.is_alive()]
        assert not alive, f"hostile server threads still running: {alive}"

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals -------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._socks.append(conn)
                self.connections += 1
            self._spawn(self._serve, conn)

    def _next_script(self, path: str) -> list[Step] | None:
        with self._lock:
            left = self.times.get(path)
            if path not in self.scripts or left == 0:
                return None
            if left is not None:
                self.times[path] = left - 1
            return self.scripts[path]

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = _read_head(conn, self._stop)
            if head is None:
                return
            path, rng = head
            with self._lock:
                self.requests.append((path, rng))
            steps = self._next_script(path)
            if steps is None:
                conn.sendall(self._honest(path, rng))
            else:
                self._play(conn, steps)
        except OSError:
            pass  # the client hung up: that is what a hostile server expects
        finally:
            _close_quietly(conn)

    def _play(self, conn: socket.socket, steps: list[Step]) -> None:
        for step in steps:
            if isinstance(step, Send):
                conn.sendall(step.data)
            elif isinstance(step, Trickle):
                for i in range(0, len(step.data), step.size):
                    if self._stop.wait(step.every_s):
                        return
                    conn.sendall(step.data[i:i + step.size])
            elif isinstance(step, Endless):
                while not self._stop.wait(step.every_s):
                    conn.sendall(step.data)
            elif isinstance(step, Reset):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            elif isinstance(step, Hang):
                self._stop.wait()
                return

    def _honest(self, path: str, rng: str | None) -> bytes:
        file = None if self.root is None else (self.root / path.lstrip("/")).resolve()
        if file is None or not file.is_file() or self.root is None or \
                not file.is_relative_to(self.root.resolve()):
            return response("HTTP/1.1 404 Not Found", [("Content-Length", "0")])
        data = file.read_bytes()
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            first = int(rng[6:-1])
            return response("HTTP/1.1 206 Partial Content",
                            [("Content-Length", str(len(data) - first)),
                             ("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")],
                            data[first:])
        return response("HTTP/1.1 200 OK", [("Content-Length", str(len(data)))], data)


def _read_head(conn: socket.socket, stop: threading.Event) -> tuple[str, str | None] | None:
    """Path and Range header of one request (None if the client sent none in 5 s)."""
    conn.settimeout(0.1)
    buf = b""
    give_up = time.monotonic() + 5
    while b"\r\n\r\n" not in buf:
        if stop.is_set() or time.monotonic() > give_up or len(buf) > 65536:
            return None
        try:
            piece = conn.recv(4096)
        except TimeoutError:
            continue
        if not piece:
            return None
        buf += piece
    conn.settimeout(30)  # a client that never reads cannot pin a thread for long
    lines = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1]
    rng = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "range":
            rng = value.strip()
    return unquote(urlsplit(target).path), rng


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
