"""HTTP/1.1 on the wire for the agent: one deadline per fetch, strict response checks.

:class:`DeadlineConnection` is an ``http.client.HTTPConnection`` whose socket sets its
timeout to the time left before every read and write, so connect, status line, headers
and body all count against one deadline (a peer trickling headers a byte at a time fails
at the deadline). :func:`check_response` accepts only plain ASCII byte counts and a
consistent Content-Length / Content-Range; :func:`reraise` maps whatever ``http.client``
and the socket raise to one typed :class:`DownloadError`.
"""

from __future__ import annotations

import http.client
import io
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from solar_edge.errors import (
    DownloadError,
    HTTPStatusError,
    MalformedResponseError,
    SlowRetrievalError,
)

_NUMBER = re.compile(r"[0-9]{1,18}")   # ASCII digits only: str.isdigit also accepts '²', '١'
_RANGE = re.compile(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18})")
HTTP_FAULTS = (http.client.HTTPException, ValueError, UnicodeError, LookupError)


class _Deadline(TimeoutError):
    """Raised inside a read or write once the fetch's overall deadline has passed."""


class _DeadlineSocket:
    """A connected socket whose every read and write waits at most until ``deadline``.

    Before each call the socket timeout is set to the smaller of the per-read timeout
    and the time left, so a peer trickling bytes cannot stretch a fetch: a trickled
    status line or header fails at the deadline, not at the first idle read timeout.
    """

    def __init__(self, sock: socket.socket, deadline: float, read_timeout_s: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.read_timeout_s = read_timeout_s
        self._files = 0        # like socket.makefile: the fd lives while a file is open
        self._closed = False

    def arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Deadline("fetch deadline passed")
        self.sock.settimeout(min(self.read_timeout_s, left))

    def sendall(self, data: bytes) -> None:
        self.arm()
        self.sock.sendall(data)

    def recv_into(self, buffer: memoryview) -> int:
        self.arm()
        return self.sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", buffering: int | None = None) -> io.BufferedReader:
        self._files += 1
        return io.BufferedReader(_DeadlineRaw(self))

    def setsockopt(self, *args: int) -> None:
        self.sock.setsockopt(*args)

    def file_closed(self) -> None:
        self._files -= 1
        if self._closed and self._files <= 0:
            self.sock.close()

    def close(self) -> None:
        self._closed = True
        if self._files <= 0:
            self.sock.close()


class _DeadlineRaw(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.file_closed()
        super().close()


class DeadlineConnection(http.client.HTTPConnection):
    """``HTTPConnection`` whose connect, request and response share one deadline."""

    def __init__(self, host: str, port: int | None, read_timeout_s: float,
                 deadline: float) -> None:
        super().__init__(host, port, timeout=read_timeout_s)
        self.read_timeout_s = read_timeout_s
        self.deadline = deadline

    def connect(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Deadline("fetch deadline passed")
        self.timeout = min(self.read_timeout_s, left)
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.deadline, self.read_timeout_s)


def _number(value: str, name: str, url: str) -> int:
    if not _NUMBER.fullmatch(value):
        raise MalformedResponseError(f"GET {url}: {name} {value[:40]!r} is not a byte count")
    return int(value)


def _content_length(resp: http.client.HTTPResponse, url: str) -> int | None:
    """The one Content-Length of ``resp``; repeated or listed values must all agree."""
    values = resp.headers.get_all("Content-Length") or []
    if not values:
        return None
    if resp.headers.get("Transfer-Encoding") is not None:
        raise MalformedResponseError(f"GET {url}: both Content-Length and Transfer-Encoding")
    parsed = {_number(part.strip(), "Content-Length", url)
              for value in values for part in value.split(",")}
    if len(parsed) != 1:
        raise MalformedResponseError(f"GET {url}: conflicting Content-Length {sorted(parsed)}")
    return parsed.pop()


def _parse_content_range(value: str, start: int, url: str) -> tuple[int, int]:
    """``(first, total)`` of a 206's ``bytes first-last/total``, which must run to the end."""
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        raise MalformedResponseError(f"GET {url}: malformed Content-Range {value[:60]!r}")
    first, last, total = (int(g) for g in match.groups())
    if not first <= last < total or last != total - 1:
        raise MalformedResponseError(f"GET {url}: Content-Range {value[:60]!r} is not "
                                     f"the rest of the file")
    if first != start:
        raise MalformedResponseError(f"GET {url}: asked for byte {start}, got {first}")
    return first, total


@dataclass(frozen=True)
class Head:
    offset: int
    total: int | None
    declared: int | None


def check_response(resp: http.client.HTTPResponse, url: str, start: int) -> Head:
    if resp.status not in (200, 206):
        reason = str(resp.reason)[:80]
        raise HTTPStatusError(f"GET {url}: HTTP {resp.status} {reason!r}"
                              + (" (redirects are not followed)"
                                 if 300 <= resp.status < 400 else ""), resp.status)
    if resp.headers.defects:  # e.g. a line without a colon: the rest would be dropped
        names = sorted({type(d).__name__ for d in resp.headers.defects})
        raise MalformedResponseError(f"GET {url}: header block does not parse: {names}")
    declared = _content_length(resp, url)
    if resp.status == 200:
        return Head(0, declared, declared)  # server ignored the range: whole file again
    ranges = resp.headers.get_all("Content-Range") or []
    if len(ranges) != 1:
        raise MalformedResponseError(f"GET {url}: a 206 needs one Content-Range, got "
                                     f"{len(ranges)}")
    first, total = _parse_content_range(ranges[0], start, url)
    if declared is not None and declared != total - first:
        raise MalformedResponseError(f"GET {url}: Content-Length {declared} does not match "
                                     f"Content-Range {ranges[0][:60]!r}")
    return Head(first, total, declared)


def reraise(exc: BaseException, url: str, deadline: float, budget: float,
             where: str) -> NoReturn:
    """Map what ``http.client`` and the socket raise to one typed DownloadError."""
    if isinstance(exc, DownloadError):
        raise exc
    if isinstance(exc, _Deadline) or (isinstance(exc, TimeoutError)
                                      and time.monotonic() >= deadline):
        raise SlowRetrievalError(f"GET {url}: too slow, deadline of {budget:.1f} s passed "
                                 f"{where}") from exc
    if isinstance(exc, TimeoutError):
        raise SlowRetrievalError(f"GET {url}: no data for the read timeout {where}") from exc
    if isinstance(exc, (OSError, http.client.IncompleteRead)):
        raise DownloadError(f"GET {url}: connection failed {where}: "
                            f"{type(exc).__name__}: {exc}") from exc
    if isinstance(exc, HTTP_FAULTS):
        raise MalformedResponseError(f"GET {url}: malformed response {where}: "
                                     f"{type(exc).__name__}: {str(exc)[:80]!r}") from exc
    raise exc
