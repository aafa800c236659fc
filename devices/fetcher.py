"""Transport for the update agent: a one-method interface, an HTTP client, an in-memory double.

``Transport.get(url, start, deadline_s)`` returns the body from byte ``start`` on (HTTP
Range) as an iterator of chunks; the whole get, headers included, ends by ``deadline_s``.
:func:`download_resumable` keeps a partial file on disk and asks for the rest after an
interruption, bounded in attempts, bytes and one overall deadline. :class:`TufFetcher`
lets python-tuf's ``ngclient.Updater`` fetch metadata through the same transport (with a
deadline per metadata file), so unit tests can run the whole agent against
:class:`MemoryTransport`. Wire-level checks live in ``httpwire``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from solar_edge.devices.httpwire import HTTP_FAULTS, DeadlineConnection, check_response, reraise
from solar_edge.errors import (
    DownloadError,
    HTTPStatusError,
    IntegrityError,
    MetadataExpiredError,
    MetadataRollbackError,
    MetadataSignatureError,
    RepositoryError,
    SlowRetrievalError,
    SolarEdgeError,
)

__all__ = ["Body", "DownloadPolicy", "HTTPStatusError", "HttpTransport", "MemoryTransport",
           "Transport", "TufFetcher", "download_resumable", "translate_tuf_error"]

CHUNK = 16 * 1024


@dataclass
class Body:
    """A response body starting at byte ``offset`` of a file of ``total`` bytes (if known)."""

    offset: int
    total: int | None
    chunks: Iterator[bytes]
    close: Callable[[], None] = lambda: None


class Transport(Protocol):
    def get(self, url: str, start: int = 0, deadline_s: float | None = None) -> Body:
        """Body of ``url`` from byte ``start`` (0: whole file). Raises DownloadError.

        ``deadline_s``: seconds from now by which the whole get, headers and body, must
        be done (None: the transport's own bounds only).
        """
        ...


def check_http_url(url: str) -> SplitResult:
    """The URL's parts; DownloadError unless it is ``http://HOST...`` (no TLS client yet)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise DownloadError(f"only http:// URLs are supported here, got {url!r:.200}")
    return parts


class HttpTransport:
    """HTTP/1.1 client on ``http.client``; one connection and one deadline per get.

    ``timeout_s`` bounds connect and each read; ``max_fetch_s`` (None: no cap) bounds a
    whole get, connect, status line, headers and body together, as does the
    ``deadline_s`` a caller passes (the smaller applies). Redirects are not followed.
    Every failure is a :class:`DownloadError`: :class:`HTTPStatusError`,
    :class:`MalformedResponseError` or :class:`SlowRetrievalError`.
    """

    def __init__(self, timeout_s: float = 30.0, user_agent: str = "solar-edge-agent",
                 max_fetch_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.max_fetch_s = max_fetch_s

    def get(self, url: str, start: int = 0, deadline_s: float | None = None) -> Body:
        parts = check_http_url(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise DownloadError(f"bad port in {url!r}") from exc
        limits = [s for s in (deadline_s, self.max_fetch_s) if s is not None]
        budget = min(limits) if limits else math.inf
        deadline = time.monotonic() + budget
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = DeadlineConnection(parts.hostname, port, self.timeout_s, deadline)
        headers = {"User-Agent": self.user_agent}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        try:
            conn.request("GET", path or "/", headers=headers)
            resp = conn.getresponse()
        except BaseException as exc:
            conn.close()
            reraise(exc, url, deadline, budget, "before the body")

        def close() -> None:
            resp.close()
            conn.close()

        try:
            head = check_response(resp, url, start)
        except BaseException as exc:
            close()
            reraise(exc, url, deadline, budget, "before the body")

        def chunks() -> Iterator[bytes]:
            got = 0
            try:
                while True:
                    block = resp.read1(CHUNK)  # whatever has arrived: steady progress
                    if not block:
                        break
                    got += len(block)
                    yield block
            except (OSError, *HTTP_FAULTS) as exc:
                reraise(exc, url, deadline, budget, f"after {got} body bytes")
            finally:
                close()
            if head.declared is not None and got < head.declared:
                raise DownloadError(f"GET {url}: connection closed after {got} of "
                                    f"{head.declared} bytes")

        return Body(head.offset, head.total, chunks(), close)


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

    def get(self, url: str, start: int = 0, deadline_s: float | None = None) -> Body:
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
    """python-tuf fetcher over a :class:`Transport` (metadata is small: no resume).

    Each metadata file gets ``deadline_s`` for the whole fetch, headers included (the
    transport enforces it per read; chunks are also checked here for any transport);
    python-tuf's ``UpdaterConfig`` caps the length. Only tuf ``DownloadError`` escapes.
    """

    def __init__(self, transport: Transport, deadline_s: float = 60.0) -> None:
        self.transport = transport
        self.deadline_s = deadline_s
        self.last_url: str | None = None   # named in errors about what it returned

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """As python-tuf's, but remembers ``url`` and names it in a length error."""
        self.last_url = url
        try:
            return super().download_bytes(url, max_length)
        except tuf_exc.DownloadLengthMismatchError as exc:
            raise tuf_exc.DownloadLengthMismatchError(f"GET {url}: {exc}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        deadline = time.monotonic() + self.deadline_s
        try:
            body = self.transport.get(url, deadline_s=self.deadline_s)
        except DownloadError as exc:
            raise _tuf_error(exc) from exc
        return self._wrap(body, url, deadline)

    @staticmethod
    def _wrap(body: Body, url: str, deadline: float) -> Iterator[bytes]:
        try:
            for block in body.chunks:
                yield block
                if time.monotonic() > deadline:
                    raise SlowRetrievalError(f"GET {url}: too slow, metadata deadline passed")
        except DownloadError as exc:
            raise _tuf_error(exc) from exc
        finally:
            body.close()


def _tuf_error(exc: DownloadError) -> tuf_exc.DownloadError:
    if isinstance(exc, HTTPStatusError):
        return tuf_exc.DownloadHTTPError(str(exc), exc.status)
    if isinstance(exc, SlowRetrievalError):
        return tuf_exc.SlowRetrievalError(str(exc))
    return tuf_exc.DownloadError(str(exc))


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
    ``policy.attempts`` consecutive failures or at the one overall deadline, which the
    transport also enforces within each get (SlowRetrievalError). The bytes are not
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
            raise SlowRetrievalError(f"{url}: too slow, {have} of {length} bytes before the "
                                     f"deadline")
        try:  # the transport gets what is left of the one deadline: headers count too
            body = transport.get(url, start=have, deadline_s=deadline - clock())
            try:
                _append(body, part, have, length, url, clock, deadline, on_progress)
            finally:
                body.close()
            failures = 0
        except DownloadError:
            failures += 1
            if failures >= policy.attempts or clock() > deadline:
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
                raise SlowRetrievalError(f"{url}: too slow, {pos} of {length} bytes before "
                                         f"the deadline")
        out.flush()
        os.fsync(out.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


_TUF_ERRORS: list[tuple[type[Exception], type[RepositoryError]]] = [
    (tuf_exc.UnsignedMetadataError, MetadataSignatureError),
    (tuf_exc.ExpiredMetadataError, MetadataExpiredError),
    (tuf_exc.BadVersionNumberError, MetadataRollbackError),
    (tuf_exc.LengthOrHashMismatchError, IntegrityError),
]


def translate_tuf_error(exc: Exception) -> SolarEdgeError:
    """python-tuf errors -> solar-edge's typed errors (caller raises ``from exc``)."""
    for tuf_type, ours in _TUF_ERRORS:
        if isinstance(exc, tuf_type):
            return ours(str(exc))
    if isinstance(exc, tuf_exc.SlowRetrievalError):
        return SlowRetrievalError(str(exc))
    if isinstance(exc, tuf_exc.DownloadError):
        return DownloadError(str(exc))
    return RepositoryError(f"{type(exc).__name__}: {exc}")
