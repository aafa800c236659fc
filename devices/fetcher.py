"""Transport for the update agent: a one-method interface, an HTTP client, an in-memory double.

``Transport.get(url, start)`` returns the body from byte ``start`` on (HTTP Range) as an
iterator of chunks. :func:`download_resumable` keeps a partial file on disk and asks for
the rest after an interruption, bounded in attempts, bytes and time. :class:`TufFetcher`
lets python-tuf's ``ngclient.Updater`` fetch metadata through the same transport, so unit
tests can run the whole agent against :class:`MemoryTransport`.
"""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from solar_edge.errors import DownloadError, IntegrityError

CHUNK = 16 * 1024


class HTTPStatusError(DownloadError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


@dataclass
class Body:
    """A response body starting at byte ``offset`` of a file of ``total`` bytes (if known)."""

    offset: int
    total: int | None
    chunks: Iterator[bytes]
    close: Callable[[], None] = lambda: None


class Transport(Protocol):
    def get(self, url: str, start: int = 0) -> Body:
        """Body of ``url`` from byte ``start`` (0: whole file). Raises DownloadError."""
        ...


def _parse_content_range(value: str) -> tuple[int, int, int]:
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        first, last = span.split("-", 1)
        if unit != "bytes":
            raise ValueError(unit)
        return int(first), int(last), int(total)
    except ValueError as exc:
        raise DownloadError(f"malformed Content-Range {value!r}") from exc


class HttpTransport:
    """HTTP/1.1 client on ``http.client`` with connect/read timeouts; one connection per get."""

    def __init__(self, timeout_s: float = 30.0, user_agent: str = "solar-edge-agent") -> None:
        self.timeout_s = timeout_s
        self.user_agent = user_agent

    def get(self, url: str, start: int = 0) -> Body:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise DownloadError(f"only http:// URLs are supported here, got {url!r}")
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout_s)
        headers = {"User-Agent": self.user_agent}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        try:
            conn.request("GET", path or "/", headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DownloadError(f"GET {url}: {exc}") from exc
        if resp.status not in (200, 206):
            conn.close()
            raise HTTPStatusError(f"GET {url}: HTTP {resp.status} {resp.reason}", resp.status)
        length = resp.getheader("Content-Length")
        declared = int(length) if length is not None and length.isdigit() else None
        if resp.status == 206:
            first, _last, size = _parse_content_range(resp.getheader("Content-Range", ""))
            total: int | None = size
            if first != start:
                conn.close()
                raise DownloadError(f"GET {url}: asked for byte {start}, got {first}")
            offset = first
        else:
            offset, total = 0, declared  # server ignored the range: the whole file again

        def chunks() -> Iterator[bytes]:
            got = 0
            try:
                while True:
                    block = resp.read1(CHUNK)  # whatever has arrived: steady progress
                    if not block:
                        break
                    got += len(block)
                    yield block
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(f"GET {url}: connection lost after {got} bytes") from exc
            finally:
                conn.close()
            if declared is not None and got < declared:
                raise DownloadError(f"GET {url}: connection closed after {got} of {declared} bytes")

        return Body(offset, total, chunks(), conn.close)


@dataclass
class MemoryTransport:
    """In-memory double of a repository server for unit tests: files by URL path.

    ``drops`` maps a path to byte counts: each request for that path consumes the first
    count and delivers only that many bytes before failing, as a dropped connection.
    ``down`` makes every request fail as if nothing listened. ``requests`` logs
    ``(path, start)``.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    drops: dict[str, list[int]] = field(default_factory=dict)
    down: bool = False
    requests: list[tuple[str, int]] = field(default_factory=list)

    def get(self, url: str, start: int = 0) -> Body:
        path = urlsplit(url).path
        self.requests.append((path, start))
        if self.down:
            raise DownloadError(f"GET {url}: connection refused (memory transport is down)")
        if path not in self.files:
            raise HTTPStatusError(f"GET {url}: HTTP 404", 404)
        data = self.files[path]
        if start > len(data):
            raise HTTPStatusError(f"GET {url}: HTTP 416", 416)
        pending = self.drops.get(path)
        cut = pending.pop(0) if pending else None

        def chunks() -> Iterator[bytes]:
            body = data[start:]
            limit = len(body) if cut is None else min(cut, len(body))
            for i in range(0, limit, CHUNK):
                yield body[i:min(i + CHUNK, limit)]
            if cut is not None and cut < len(body):
                raise DownloadError(f"GET {url}: connection dropped after {cut} bytes")

        return Body(start, len(data), chunks())


class TufFetcher(FetcherInterface):
    """python-tuf fetcher over a :class:`Transport` (metadata is small: no resume)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            body = self.transport.get(url)
        except HTTPStatusError as exc:
            raise tuf_exc.DownloadHTTPError(str(exc), exc.status) from exc
        except DownloadError as exc:
            raise tuf_exc.DownloadError(str(exc)) from exc
        return self._wrap(body)

    @staticmethod
    def _wrap(body: Body) -> Iterator[bytes]:
        try:
            yield from body.chunks
        except DownloadError as exc:
            raise tuf_exc.DownloadError(str(exc)) from exc


@dataclass(frozen=True)
class DownloadPolicy:
    """Bounds of one resumable download: attempts, backoff, and a floor on average speed."""

    attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    min_rate_bps: float = 1000.0   # slower than this on average: slow-retrieval attack
    grace_s: float = 30.0          # added to length / min_rate for the overall deadline


def download_resumable(transport: Transport, url: str, part: Path, length: int,
                       policy: DownloadPolicy = DownloadPolicy(),
                       sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.monotonic,
                       on_progress: Callable[[int], None] | None = None) -> Path:
    """Complete ``part`` to exactly ``length`` bytes from ``url``, resuming what is there.

    Never writes past ``length`` (endless-data defence: IntegrityError), gives up after
    ``policy.attempts`` consecutive failures or the overall deadline. The bytes are not
    verified here: the caller checks them against signed metadata.
    """
    deadline = clock() + policy.grace_s + length * 8 / policy.min_rate_bps
    failures = 0
    part.parent.mkdir(parents=True, exist_ok=True)
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if have == length:
            _fsync_file(part)
            return part
        if clock() > deadline:
            raise DownloadError(f"{url}: too slow, {have} of {length} bytes before the deadline")
        try:
            body = transport.get(url, start=have)
            try:
                _append(body, part, have, length, url, clock, deadline, on_progress)
            finally:
                body.close()
            failures = 0
        except DownloadError:
            failures += 1
            if failures >= policy.attempts:
                raise
            sleep(min(policy.backoff_max_s, policy.backoff_s * 2 ** (failures - 1)))


def _append(body: Body, part: Path, have: int, length: int, url: str,
            clock: Callable[[], float], deadline: float,
            on_progress: Callable[[int], None] | None) -> None:
    if body.total is not None and body.total != length:
        raise IntegrityError(f"{url}: server has {body.total} bytes, metadata says {length}")
    mode = "ab" if body.offset == have and have > 0 else "wb"
    pos = body.offset if mode == "ab" else 0
    with open(part, mode) as out:
        for block in body.chunks:
            if pos + len(block) > length:
                raise IntegrityError(f"{url}: server sent more than the {length} bytes signed for")
            out.write(block)
            pos += len(block)
            if on_progress is not None:
                out.flush()
                on_progress(pos)
            if clock() > deadline:
                raise DownloadError(f"{url}: too slow, {pos} of {length} bytes before the deadline")
        out.flush()
        os.fsync(out.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
