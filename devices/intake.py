"""Connection intake for the repository server: headers read without a thread per connection.

One selector loop accepts connections and collects each request's header block
(non-blocking reads) under a deadline and a size cap; only a complete header block is
handed to a worker. So a client that trickles its headers (slowloris) costs one socket
and a few bytes of buffer, never a worker, and is dropped at ``header_timeout_s``. At
``max_connections`` open connections the one that has waited longest for its headers
is dropped to make room for the newcomer, so idle connections cannot lock others out.
A worker that keeps the connection alive gives it back with :meth:`Intake.resume`.
"""

from __future__ import annotations

import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_TERMINATORS = (b"\r\n\r\n", b"\n\n")


@dataclass
class Conn:
    """One client connection and what has arrived of its next request."""

    sock: socket.socket
    addr: tuple[str, int]
    buf: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0
    served: int = 0   # requests answered on this connection so far


def header_end(buf: bytes | bytearray) -> int:
    """Index just past the header block's blank line, or -1 while it is incomplete."""
    ends = [i + len(t) for t in _TERMINATORS if (i := buf.find(t)) >= 0]
    return min(ends) if ends else -1


def _reply_and_close(sock: socket.socket, status: str) -> None:
    """Best-effort short answer from the loop thread (non-blocking; may be cut)."""
    try:
        sock.send(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                  .encode())
    except OSError:
        pass
    sock.close()


class Intake:
    """Accept loop and header collector; ``dispatch(conn, head)`` gets complete requests."""

    def __init__(self, listener: socket.socket, dispatch: Callable[[Conn, bytes], None],
                 max_connections: int, header_timeout_s: float, max_header_bytes: int) -> None:
        self.listener = listener
        self.dispatch = dispatch
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.dropped = {"evicted": 0, "header timeout": 0, "header too large": 0, "refused": 0}
        listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pending: dict[socket.socket, Conn] = {}   # insertion order = deadline order
        self._resumed: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self._open = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    # -- called from worker threads -------------------------------------------------
    def resume(self, conn: Conn) -> None:
        """Give a kept-alive connection back to wait (under a fresh deadline) for more."""
        self._resumed.put(conn)
        self._wake()

    def release(self, conn: Conn) -> None:
        """Close a connection a worker is done with."""
        conn.sock.close()
        with self._lock:
            self._open -= 1

    # -- the loop -----------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._done.clear()
        try:
            while not self._stop.is_set():
                timeout = poll_interval
                if self._pending:
                    oldest = next(iter(self._pending.values()))
                    timeout = max(0.0, min(timeout, oldest.deadline - time.monotonic()))
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    elif (conn := self._pending.get(key.fileobj)) is not None:  # type: ignore[call-overload]
                        self._read(conn)
                self._take_resumed()
                self._expire()
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (from another thread) and wait for it."""
        self._stop.set()
        self._wake()
        self._done.wait()

    def close(self) -> None:
        for conn in list(self._pending.values()):
            self._drop(conn)
        for sock in (self.listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:   # full (a wake-up is already pending) or closed
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, addr = self.listener.accept()
            except OSError:   # BlockingIOError when the backlog is empty; EMFILE
                return
            with self._lock:
                full = self._open >= self.max_connections
            if full and self._pending:
                self.dropped["evicted"] += 1
                self._drop(next(iter(self._pending.values())))
            elif full:
                self.dropped["refused"] += 1
                sock.close()
                continue
            with self._lock:
                self._open += 1
            self._wait_for_headers(Conn(sock, addr))

    def _wait_for_headers(self, conn: Conn) -> None:
        conn.sock.setblocking(False)
        conn.deadline = time.monotonic() + self.header_timeout_s
        self._pending[conn.sock] = conn
        self._selector.register(conn.sock, selectors.EVENT_READ)
        self._check(conn)

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(16384)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.buf += data
        self._check(conn)

    def _check(self, conn: Conn) -> None:
        end = header_end(conn.buf)
        if (end < 0 and len(conn.buf) > self.max_header_bytes) or end > self.max_header_bytes:
            self.dropped["header too large"] += 1
            self._drop(conn, "431 Request Header Fields Too Large")
            return
        if end < 0:
            return
        head = bytes(conn.buf[:end])
        del conn.buf[:end]
        self._forget(conn)
        self.dispatch(conn, head)

    def _take_resumed(self) -> None:
        while True:
            try:
                conn = self._resumed.get_nowait()
            except queue.Empty:
                return
            if self._stop.is_set():
                self.release(conn)
            else:
                self._wait_for_headers(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.deadline > now:
                return
            self.dropped["header timeout"] += 1
            self._drop(oldest, "408 Request Timeout" if oldest.buf else None)

    def _forget(self, conn: Conn) -> None:
        self._pending.pop(conn.sock, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, conn: Conn, status: str | None = None) -> None:
        self._forget(conn)
        if status:
            _reply_and_close(conn.sock, status)
        else:
            conn.sock.close()
        with self._lock:
            self._open -= 1
