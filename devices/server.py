"""A real HTTP server for a repository folder: Range requests and a per-connection throttle.

Serves files under one root (GET and HEAD only, no listings, no path escapes). With a
:class:`~solar_edge.profiles.links.LinkProfile` of kind ``tcp`` every connection pays one
round trip at accept (the TCP handshake), every response one more (request up, first byte
down), and the response bytes are paced at :func:`~solar_edge.profiles.links.goodput_bps`.
Loss is not injected: its cost is folded into the paced rate. Tests can make the server
drop a connection after a given number of body bytes (:meth:`Faults.drop`).

Bounded: at most ``max_connections`` handler threads, a socket timeout per read, a cap on
request header size (``http.server`` limits lines to 64 KiB and headers to 100).
"""

from __future__ import annotations

import http.server
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from solar_edge.errors import ProfileError
from solar_edge.profiles.links import LinkProfile, goodput_bps

BLOCK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Faults:
    """Injected failures, for tests: drop the connection after N body bytes."""

    _drops: dict[str, list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def drop(self, path: str, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self._drops.setdefault(path, []).extend([after_bytes] * times)

    def take(self, path: str) -> int | None:
        with self._lock:
            queue = self._drops.get(path)
            return queue.pop(0) if queue else None


class Throttle:
    """Paces one connection's bytes at ``rate_bps`` after a first-byte delay."""

    def __init__(self, rate_bps: float, chunk: int) -> None:
        self.rate_bps = rate_bps
        self.chunk = chunk
        self.start = time.monotonic()
        self.sent = 0

    def wait(self, nbytes: int) -> None:
        due = self.start + (self.sent + nbytes) * 8 / self.rate_bps
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.sent += nbytes


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` inclusive for a single ``bytes=`` range, ``None`` for the whole file.

    Raises ValueError for an unsatisfiable range (answer 416). Multi-range and unknown
    units are ignored (whole file), as RFC 9110 allows.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first_s, last_s = match.groups()
    if not first_s and not last_s:
        return None
    if not first_s:  # suffix: last N bytes
        n = int(last_s)
        if n == 0:
            raise ValueError("empty suffix range")
        return max(0, size - n), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if first >= size or last < first:
        raise ValueError(f"range {header!r} not satisfiable for {size} bytes")
    return first, min(last, size - 1)


class RepoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 link: LinkProfile | None = None, max_connections: int = 32,
                 timeout_s: float = 30.0) -> None:
        if link is not None and link.kind != "tcp":
            raise ProfileError(f"link {link.name!r} ({link.kind}) carries no HTTP/TCP; its times "
                               "are computed by the link model (solar-edge linkbench)")
        self.root = Path(root).resolve()
        self.link = link
        self.faults = Faults()
        self.timeout_s = timeout_s
        self.slots = threading.BoundedSemaphore(max_connections)
        self.bytes_sent = 0
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header), for tests
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"

    def add_sent(self, n: int) -> None:
        with self._count_lock:
            self.bytes_sent += n

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            request.close()  # over the connection cap: refuse rather than queue unboundedly
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        """A client that hangs up mid-body is normal on a flaky link: no traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def start(self) -> RepoServer:
        """Serve from a daemon thread; returns self (use ``stop`` or a ``with`` block)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RepoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RepoServer
    protocol_version = "HTTP/1.1"
    server_version = "solar-edge-repo/1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.timeout_s)
        self.throttle: Throttle | None = None
        link = self.server.link
        if link is not None:
            time.sleep(link.rtt_s)  # TCP handshake
            self.throttle = Throttle(goodput_bps(link), link.mss)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if os.environ.get("SOLAR_EDGE_SERVER_LOG"):
            super().log_message(format, *args)

    def _resolve(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
            return None
        target = (self.server.root / rel).resolve()
        if self.server.root not in target.parents or not target.is_file():
            return None
        return target

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        step = self.throttle.chunk if self.throttle else BLOCK
        for i in range(0, len(view), step):
            piece = view[i:i + step]
            if self.throttle:
                self.throttle.wait(len(piece))
            self.wfile.write(piece)
            self.server.add_sent(len(piece))

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        if len(self.server.requests) < 10000:
            self.server.requests.append((self.path, self.headers.get("Range")))
        if self.throttle:
            time.sleep(2 * self.server.link.latency_s if self.server.link else 0)  # request RTT
            self.throttle.start, self.throttle.sent = time.monotonic(), 0
        target = self._resolve()
        if target is None:
            self._error(404, "not found")
            return
        size = target.stat().st_size
        try:
            span = parse_range(self.headers.get("Range"), size)
        except ValueError:
            self._error(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
            return
        first, last = span if span else (0, size - 1)
        length = last - first + 1 if size else 0
        head = [f"HTTP/1.1 {206 if span else 200} {'Partial Content' if span else 'OK'}",
                f"Content-Length: {length}", "Content-Type: application/octet-stream",
                "Accept-Ranges: bytes", "Cache-Control: no-store"]
        if span:
            head.append(f"Content-Range: bytes {first}-{last}/{size}")
        self._send(("\r\n".join(head) + "\r\n\r\n").encode())
        if not body:
            return
        drop = self.server.faults.take("/" + target.relative_to(self.server.root).as_posix())
        with open(target, "rb") as src:
            src.seek(first)
            remaining = length
            while remaining > 0:
                block = src.read(min(BLOCK, remaining))
                if not block:
                    break
                if drop is not None and drop < len(block):
                    self._send(block[:drop])
                    self._abort()
                    return
                if drop is not None:
                    drop -= len(block)
                self._send(block)
                remaining -= len(block)

    def _abort(self) -> None:
        """Drop the connection mid-body, as a lost link does."""
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True

    def _error(self, status: int, message: str, extra: dict[str, str] | None = None) -> None:
        data = message.encode()
        lines = [f"HTTP/1.1 {status} {message}", f"Content-Length: {len(data)}",
                 "Content-Type: text/plain"]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        self._send(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
