"""A real HTTP server for a repository folder: Range requests and a per-connection throttle.

Serves files under one root (GET and HEAD only, no listings, no path escapes, never a
dotfile or a ``*.key`` file; ``only`` limits it to some top-level folders, which
``solar-edge serve`` sets to a repository's ``metadata/`` and ``targets/``). With a
:class:`~solar_edge.profiles.links.LinkProfile` of kind ``tcp`` every connection pays one
round trip at accept (the TCP handshake), every response one more (request up, first byte
down), and the response bytes are paced at :func:`~solar_edge.profiles.links.goodput_bps`.
Loss is not injected: its cost is folded into the paced rate. Tests can make the server
drop a connection after a given number of body bytes (:meth:`Faults.drop`).

Bounded against hostile clients: request headers are collected by one selector loop
(:mod:`.intake`) under ``header_timeout_s`` and a 16 KiB cap, so slow senders hold no
worker; at most ``max_connections`` are open (the longest-waiting header sender makes room
for a newcomer); ``workers`` threads answer complete requests; every response must be
taken by the client within ``timeout_s`` plus its length at ``min_send_bps`` bit/s, or the
connection is cut (the default floor, 1000 bit/s, is the agent's own and below the
slowest TCP link profile; a response that fits the socket buffers frees its worker at
once). Malformed paths (NUL and other control characters, invalid percent escapes or
UTF-8, over :data:`MAX_PATH_CHARS` or :data:`MAX_SEGMENTS`) get 400.
"""

from __future__ import annotations

import http.server
import io
import os
import queue
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from solar_edge.devices.intake import Conn, Intake
from solar_edge.errors import ProfileError
from solar_edge.profiles.links import LinkProfile, goodput_bps

BLOCK = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_PATH_CHARS = 1024
MAX_SEGMENTS = 32
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


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


class RepoServer:
    """Serves ``root``; use ``start``/``stop``, a ``with`` block, or ``serve_forever``."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 link: LinkProfile | None = None, max_connections: int = 1024,
                 timeout_s: float = 30.0, header_timeout_s: float = 10.0,
                 workers: int = 32, min_send_bps: float = 1000.0,
                 only: tuple[str, ...] | None = None) -> None:
        if link is not None and link.kind != "tcp":
            raise ProfileError(f"link {link.name!r} ({link.kind}) carries no HTTP/TCP; its times "
                               "are computed by the link model (solar-edge linkbench)")
        self.root = Path(root).resolve()
        self.only = only
        self.link = link
        self.faults = Faults()
        self.timeout_s = timeout_s
        self.min_send_bps = min_send_bps
        self.bytes_sent = 0
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header), for tests
        self.errors: list[str] = []   # one line per unexpected handler failure
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        listener = socket.create_server((host, port), backlog=512)
        self.server_address = listener.getsockname()
        self.intake = Intake(listener, self._queue_request, max_connections, header_timeout_s,
                             MAX_HEADER_BYTES)
        self._work: queue.Queue[tuple[Conn, bytes] | None] = queue.Queue()
        self._workers = [threading.Thread(target=self._work_loop, daemon=True)
                         for _ in range(workers)]
        for worker in self._workers:
            worker.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def add_sent(self, n: int) -> None:
        with self._count_lock:
            self.bytes_sent += n

    def _queue_request(self, conn: Conn, head: bytes) -> None:
        self._work.put((conn, head))

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            self._answer(*item)

    def _answer(self, conn: Conn, head: bytes) -> None:
        keep = False
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(self.timeout_s)
            if conn.served == 0 and self.link is not None:
                time.sleep(self.link.rtt_s)  # TCP handshake
            handler = _Handler(conn.sock, conn.addr, self, head)
            conn.served += 1
            keep = not handler.close_connection
        except OSError:   # reset, broken pipe, timeout: normal on a flaky link
            pass
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback or a dead worker
            line = f"{conn.addr[0]}: {type(exc).__name__}: {exc}"
            self.errors.append(line)
            print(f"solar-edge-repo: {line}", file=sys.stderr)
        if keep:
            self.intake.resume(conn)
        else:
            self.intake.release(conn)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.intake.serve_forever(poll_interval)

    def shutdown(self) -> None:
        self.intake.shutdown()

    def server_close(self) -> None:
        self.intake.close()
        for _ in self._workers:
            self._work.put(None)

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


class _DeadlineWriter:
    """``wfile`` for a handler: every write must finish before the response's deadline."""

    def __init__(self, sock: socket.socket, first_s: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + first_s
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("client too slow to take the response")
        self.sock.settimeout(left)
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass


def clean_path(raw: str) -> tuple[str | None, str]:
    """``(relative path, "")`` for a well-formed request target, else ``(None, reason)``.

    The path may still name nothing (answer 404); a reason means answer 400.
    """
    path = urlsplit(raw).path
    if len(path) > MAX_PATH_CHARS:
        return None, f"path longer than {MAX_PATH_CHARS} characters"
    if _BAD_ESCAPE.search(path):
        return None, "invalid percent-encoding"
    try:
        rel = unquote(path, errors="strict").lstrip("/")
    except UnicodeDecodeError:
        return None, "path is not UTF-8"
    if _CONTROL.search(rel):
        return None, "control character or backslash in path"
    if rel.count("/") >= MAX_SEGMENTS:
        return None, f"more than {MAX_SEGMENTS} path segments"
    return rel, ""


def servable(part: str) -> bool:
    """False for path segments never served: empty, dot-names (dotfiles too), ``*.key``."""
    return bool(part) and not part.startswith(".") and not part.endswith(".key") \
        and len(part) <= 255


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers one request whose header block the intake loop has already read."""

    server: RepoServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"
    server_version = "solar-edge-repo/1"

    def __init__(self, sock: socket.socket, addr: tuple[str, int], server: RepoServer,
                 head: bytes) -> None:
        self._head = head
        super().__init__(sock, addr, server)  # type: ignore[arg-type]

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._head)
        self.writer = _DeadlineWriter(self.connection, self.server.timeout_s)
        self.wfile = self.writer  # type: ignore[assignment]
        self.throttle: Throttle | None = None
        link = self.server.link
        if link is not None:
            self.throttle = Throttle(goodput_bps(link), link.mss)

    def handle(self) -> None:
        self.handle_one_request()

    def finish(self) -> None:
        self.rfile.close()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if os.environ.get("SOLAR_EDGE_SERVER_LOG"):
            super().log_message(format, *args)

    def _resolve(self, rel: str) -> Path | None:
        if not rel or any(not servable(part) for part in rel.split("/")):
            return None
        try:
            target = (self.server.root / rel).resolve()
            if self.server.root not in target.parents or not target.is_file():
                return None
            inside = target.relative_to(self.server.root).parts
            only = self.server.only
            if not all(map(servable, inside)) or (only is not None and inside[0] not in only):
                return None
        except (OSError, ValueError):
            return None
        return target

    def _allow(self, nbytes: int) -> None:
        """Deadline for the next ``nbytes`` of response: a slow reader is cut, not waited on."""
        rate = self.server.min_send_bps
        if self.throttle:
            rate = min(rate, self.throttle.rate_bps / 2)   # bit/s: half the paced rate
        self.writer.deadline = time.monotonic() + self.server.timeout_s + nbytes * 8 / rate

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
        self._allow(1024)
        if self.throttle:
            time.sleep(2 * self.server.link.latency_s if self.server.link else 0)  # request RTT
            self.throttle.start, self.throttle.sent = time.monotonic(), 0
        rel, reason = clean_path(self.path)
        if rel is None:
            self._error(400, f"bad request: {reason}")
            return
        target = self._resolve(rel)
        if target is None:
            self._error(404, "not found")
            return
        try:
            size = target.stat().st_size
            src = open(target, "rb")
        except OSError:
            self._error(404, "not found")
            return
        with src:
            self._send_file(src, size, body, target)

    def _send_file(self, src: io.BufferedReader, size: int, body: bool, target: Path) -> None:
        try:
            span = parse_range(self.headers.get("Range"), size)
        except ValueError:
            self._error(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
            return
        first, last = span if span else (0, size - 1)
        length = last - first + 1 if size else 0
        kind = "application/json" if target.suffix == ".json" else "application/octet-stream"
        head = [f"HTTP/1.1 {206 if span else 200} {'Partial Content' if span else 'OK'}",
                f"Content-Length: {length}", f"Content-Type: {kind}",
                "Accept-Ranges: bytes", "Cache-Control: no-store"]
        if span:
            head.append(f"Content-Range: bytes {first}-{last}/{size}")
        self._allow(1024 + (length if body else 0))
        self._send(("\r\n".join(head) + "\r\n\r\n").encode())
        if not body:
            return
        drop = self.server.faults.take("/" + target.relative_to(self.server.root).as_posix())
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
