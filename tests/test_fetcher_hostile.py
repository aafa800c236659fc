"""The agent's HTTP client against a hostile server on loopback (tests/hostile_http.py).

Every attack class ends in a typed DownloadError (or IntegrityError where the server lies
about lengths) within a stated time bound; the agent-facing paths (download_resumable,
TufFetcher) surface only SolarEdgeError / tuf DownloadError.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hostile_http import Endless, Hang, HostileServer, Reset, Send, Trickle, response
from ota_rig import Rig
from tuf.api import exceptions as tuf_exc

from solar_edge.devices.agent import RetryPolicy
from solar_edge.devices.fetcher import (
    Body,
    DownloadPolicy,
    HttpTransport,
    TufFetcher,
    download_resumable,
)
from solar_edge.errors import (
    DownloadError,
    HTTPStatusError,
    IntegrityError,
    MalformedResponseError,
    SlowRetrievalError,
    SolarEdgeError,
)

OK = "HTTP/1.1 200 OK"
BODY = b"0123456789"


@pytest.fixture()
def server():
    with HostileServer() as srv:
        yield srv


@contextmanager
def within(seconds: float) -> Iterator[None]:
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    assert took < seconds, f"took {took:.2f} s, bound {seconds} s"


def fetch(url: str, start: int = 0, **kw) -> bytes:
    transport = HttpTransport(timeout_s=kw.pop("timeout_s", 5.0), **kw)
    return b"".join(transport.get(url, start=start).chunks)


def ok_with(*headers: tuple[str, str]) -> bytes:
    return response(OK, list(headers), BODY)


# --- malformed headers -------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    b"\xb2", b"1\xb9", b"\xb3\xb2",  # latin-1 '²', '¹', '³': str.isdigit() but not int()
    "١٠", "１０", "12abc", "-5", "1e3", "0x0a", "+10", "9" * 5000, "", "10 10"])
def test_content_length_that_is_not_an_ascii_number_is_malformed(server, value):
    server.script("/f", Send(response(OK, [(b"Content-Length", value)], BODY)))
    with within(2), pytest.raises(MalformedResponseError, match="Content-Length"):
        fetch(server.url + "/f")


@pytest.mark.parametrize("values", [("10", "12"), ("10, 12",), ("10", "10, 11")])
def test_conflicting_content_lengths_are_malformed(server, values):
    server.script("/f", Send(ok_with(*[("Content-Length", v) for v in values])))
    with within(2), pytest.raises(MalformedResponseError, match="conflicting"):
        fetch(server.url + "/f")


def test_repeated_equal_content_lengths_are_accepted(server):
    server.script("/f", Send(ok_with(("Content-Length", "10"), ("Content-Length", "10, 10"))))
    assert fetch(server.url + "/f") == BODY


def test_content_length_with_transfer_encoding_is_malformed(server):
    server.script("/f", Send(ok_with(("Content-Length", "10"),
                                     ("Transfer-Encoding", "chunked"))))
    with pytest.raises(MalformedResponseError, match="Transfer-Encoding"):
        fetch(server.url + "/f")


@pytest.mark.parametrize("content_range", [
    None, "bytes 5-9/x", "bytes 5-9/*", "bytes ５-9/10", "bytes 5-4/10", "bytes 5-9/9",
    "bytes 5-8/10", "bytes 6-9/10", "items 5-9/10", "bytes 5-9/10/11", "9" * 5000,
    b"bytes \xb5-9/10", b"bytes 5-9/1\xb2"])
def test_bad_content_range_in_a_206_is_malformed(server, content_range):
    headers = [("Content-Length", "5")]
    if content_range is not None:
        headers.append(("Content-Range", content_range))
    server.script("/f", Send(response("HTTP/1.1 206 Partial Content", headers, BODY[5:])))
    with within(2), pytest.raises(MalformedResponseError, match="Content-Range|asked for"):
        fetch(server.url + "/f", start=5)


def test_good_206_resumes(server):
    server.script("/f", Send(response("HTTP/1.1 206 Partial Content", [
        ("Content-Length", "5"), ("Content-Range", "bytes 5-9/10")], BODY[5:])))
    body = HttpTransport().get(server.url + "/f", start=5)
    assert (body.offset, body.total, b"".join(body.chunks)) == (5, 10, BODY[5:])


def test_latin1_and_utf8_junk_in_other_header_values_does_not_break_a_response(server):
    server.script("/f", Send(response(OK, [
        (b"X-Junk", b"\xff\xfe\x80 \xe2\x82\xac \x01"), (b"X-Cafe", b"caf\xc3\xa9"),
        ("Content-Length", "10")], BODY)))
    assert fetch(server.url + "/f") == BODY


@pytest.mark.parametrize("line", [b"no colon here", b"X-\xc3\xa9: caf\xc3\xa9", b"\xff\xfe"])
def test_header_line_that_does_not_parse_is_malformed(server, line):
    """email's parser would take such a line as the body's start and drop what follows."""
    server.script("/f", Send(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 10\r\n\r\n"
                             + BODY))
    with within(2), pytest.raises(MalformedResponseError, match="does not parse"):
        fetch(server.url + "/f")


@pytest.mark.parametrize("status", [
    b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 abc OK\r\n", b"HTTP/1.1 2\xc2\xb200 OK\r\n",
    b"HTTP/2.0 200 OK\r\n", b"ICY 200 OK\r\n", b"\xff\xfe\x00\x01\r\n", b"HTTP/1.1 99999 OK\r\n"])
def test_status_line_that_is_not_http_is_malformed(server, status):
    server.script("/f", Send(status + b"\r\n"))
    with within(2), pytest.raises(MalformedResponseError):
        fetch(server.url + "/f")


def test_empty_answer_is_a_download_error(server):
    server.script("/f", Send(b""))
    with within(2), pytest.raises(DownloadError, match="connection failed"):
        fetch(server.url + "/f")


@pytest.mark.parametrize("steps", [
    (Send(b"HTTP/1.1 200 OK\r\n"), Endless(b"X-A: b\r\n" * 50)),      # header count
    (Send(b"HTTP/1.1 200 OK\r\nX-A: "), Endless(b"b" * 8192)),        # one endless line
    (Endless(b"H" * 8192),)])                                          # endless status line
def test_endless_headers_are_cut_at_http_clients_caps(server, steps):
    server.script("/f", *steps)
    with within(3), pytest.raises(MalformedResponseError, match="LineTooLong|HTTPException"):
        fetch(server.url + "/f")


def test_bad_chunk_size_is_a_download_error(server):
    server.script("/f", Send(response(OK, [("Transfer-Encoding", "chunked")], b"zz\r\nab")))
    with within(2), pytest.raises(DownloadError):
        fetch(server.url + "/f")


# --- one deadline per fetch, headers included ------------------------------------------

def test_trickled_headers_fail_at_the_deadline(server):
    """1 byte / 0.2 s of headers with a 2 s deadline: SlowRetrievalError in < 4 s."""
    server.script("/f", Trickle(ok_with(("Content-Length", "10")), every_s=0.2))
    transport = HttpTransport(timeout_s=5)
    start = time.monotonic()
    with pytest.raises(SlowRetrievalError, match="too slow.*before the body"):
        transport.get(server.url + "/f", deadline_s=2.0)
    assert 1.9 < time.monotonic() - start < 4.0


def test_per_transport_cap_bounds_a_get_without_a_deadline(server):
    server.script("/f", Trickle(ok_with(("Content-Length", "10")), every_s=0.2))
    with within(3.0), pytest.raises(SlowRetrievalError):
        fetch(server.url + "/f", max_fetch_s=1.0)


def test_trickled_body_fails_at_the_same_deadline(server):
    server.script("/f", Send(response(OK, [("Content-Length", "1000")])),
                  Trickle(b"x" * 1000, every_s=0.05, size=1))
    with within(3.0), pytest.raises(SlowRetrievalError, match="body bytes"):
        fetch(server.url + "/f", max_fetch_s=1.5)


def test_endless_interim_responses_fail_at_the_deadline(server):
    server.script("/f", Endless(b"HTTP/1.1 100 Continue\r\n\r\n", every_s=0.01))
    with within(3.0), pytest.raises(SlowRetrievalError):
        fetch(server.url + "/f", max_fetch_s=1.5)


def test_server_that_never_answers_fails_at_the_read_timeout(server):
    server.script("/f", Hang())
    with within(2.5), pytest.raises(SlowRetrievalError, match="no data"):
        fetch(server.url + "/f", timeout_s=1.0)


# --- lying lengths, redirects, resets -----------------------------------------------------

def test_body_shorter_than_content_length_is_a_download_error(server):
    server.script("/f", Send(response(OK, [("Content-Length", "100")], BODY)))
    with within(2), pytest.raises(DownloadError, match="closed after 10 of 100"):
        fetch(server.url + "/f")


@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary",
                                    "308 Permanent Redirect"])
def test_redirect_to_another_host_is_not_followed(server, status):
    with HostileServer() as other:
        other.script("/f", Send(ok_with(("Content-Length", "10"))))
        server.script("/f", Send(response(f"HTTP/1.1 {status}", [
            ("Location", other.url + "/f"), ("Content-Length", "0")])))
        with pytest.raises(HTTPStatusError, match="not followed") as err:
            fetch(server.url + "/f")
        assert err.value.status == int(status[:3])
        assert other.connections == 0


def test_reset_mid_headers_is_a_download_error(server):
    server.script("/f", Send(b"HTTP/1.1 200 OK\r\nContent-Le"), Reset())
    with within(2), pytest.raises(DownloadError, match="connection failed before the body"):
        fetch(server.url + "/f")


def test_reset_mid_body_is_a_download_error(server):
    server.script("/f", Send(response(OK, [("Content-Length", "100000")], b"x" * 5000)),
                  Reset())
    with within(2), pytest.raises(DownloadError):
        fetch(server.url + "/f")


# --- the agent-facing paths -------------------------------------------------------------

HOSTILE = {
    "bad-length": (Send(response(OK, [(b"Content-Length", b"\xb2")], BODY)),),
    "huge-length": (Send(ok_with(("Content-Length", "9" * 5000))),),
    "two-lengths": (Send(ok_with(("Content-Length", "10"), ("Content-Length", "11"))),),
    "not-http": (Send(b"SSH-2.0-x\r\n\r\n"),),
    "endless-headers": (Send(b"HTTP/1.1 200 OK\r\n"), Endless(b"X: y\r\n" * 64)),
    "trickled-headers": (Trickle(ok_with(("Content-Length", "10")), every_s=0.2),),
    "silent": (Hang(),),
    "reset": (Send(b"HTTP/1.1 200"), Reset()),
    "redirect": (Send(response("HTTP/1.1 302 Found", [("Location", "http://10.0.0.1/f"),
                                                      ("Content-Length", "0")])),),
    "bad-range": (Send(response("HTTP/1.1 206 Partial Content", [
        ("Content-Length", "10"), ("Content-Range", b"bytes 0-9/1\xb0")], BODY)),),
    "header-defect": (Send(b"HTTP/1.1 200 OK\r\n\xff\r\nContent-Length: 10\r\n\r\n" + BODY),),
    "chunked-junk": (Send(response(OK, [("Transfer-Encoding", "chunked")], b"zz\r\nab")),),
    "endless-interim": (Endless(b"HTTP/1.1 100 Continue\r\n\r\n", every_s=0.01),),
    "mid-body-reset": (Send(response(OK, [("Content-Length", "10")], b"01234")), Reset()),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_download_resumable_surfaces_only_typed_errors_within_its_deadline(server, tmp_path,
                                                                           name):
    server.script("/f", *HOSTILE[name])
    policy = DownloadPolicy(attempts=3, backoff_s=0.01, min_rate_bps=1e12, grace_s=1.5)
    with within(4.0), pytest.raises(SolarEdgeError) as err:
        download_resumable(HttpTransport(timeout_s=5), server.url + "/f", tmp_path / "p",
                           len(BODY), policy)
    assert isinstance(err.value, DownloadError)


def test_download_resumable_counts_headers_against_its_one_deadline(server, tmp_path):
    """Five attempts, each trickling headers, still end at the one 2 s deadline."""
    server.script("/f", Trickle(ok_with(("Content-Length", "10")), every_s=0.2))
    policy = DownloadPolicy(attempts=5, backoff_s=0.01, min_rate_bps=1e12, grace_s=2.0)
    start = time.monotonic()
    with pytest.raises(SlowRetrievalError, match="too slow"):
        download_resumable(HttpTransport(timeout_s=30), server.url + "/f", tmp_path / "p",
                           len(BODY), policy)
    assert 1.9 < time.monotonic() - start < 4.0
    assert len(server.requests) == 1


@pytest.mark.parametrize("steps", [
    (Send(response(OK, [("Content-Length", "20")], BODY * 2)),),     # announces more
    (Send(response(OK, [("Content-Length", "5")], BODY)),),          # announces fewer
    (Send(response(OK, [], b"")), Endless(b"x" * 4096)),             # endless body
])
def test_lying_lengths_are_integrity_errors(server, tmp_path, steps):
    server.script("/f", *steps)
    with within(2), pytest.raises(IntegrityError):
        download_resumable(HttpTransport(timeout_s=5), server.url + "/f", tmp_path / "p",
                           len(BODY), DownloadPolicy(attempts=1))
    part = tmp_path / "p"
    assert not part.exists() or part.stat().st_size <= len(BODY)  # never past the signed length


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_tuf_fetcher_surfaces_only_tuf_download_errors(server, name):
    server.script("/f", *HOSTILE[name])
    fetcher = TufFetcher(HttpTransport(timeout_s=5), deadline_s=1.5)
    with within(3.0), pytest.raises(tuf_exc.DownloadError):
        fetcher.download_bytes(server.url + "/f", max_length=1000)


def test_tuf_fetcher_deadline_covers_trickled_metadata_headers(server):
    server.script("/f", Trickle(ok_with(("Content-Length", "10")), every_s=0.2))
    fetcher = TufFetcher(HttpTransport(timeout_s=30), deadline_s=2.0)
    start = time.monotonic()
    with pytest.raises(tuf_exc.SlowRetrievalError):
        fetcher.download_bytes(server.url + "/f", max_length=1000)
    assert 1.9 < time.monotonic() - start < 4.0


class SlowChunksTransport:
    """Test double (no sockets): a transport that ignores deadlines and drips chunks."""

    def get(self, url: str, start: int = 0, deadline_s: float | None = None) -> Body:
        def chunks() -> Iterator[bytes]:
            while True:
                time.sleep(0.1)
                yield b"x"
        return Body(start, None, chunks())


def test_tuf_fetcher_enforces_its_deadline_over_any_transport():
    fetcher = TufFetcher(SlowChunksTransport(), deadline_s=1.0)
    with within(2.0), pytest.raises(tuf_exc.SlowRetrievalError):
        fetcher.download_bytes("http://repo.invalid/metadata/timestamp.json", max_length=1000)


def test_tuf_fetcher_honest_file_and_length_cap(server):
    server.script("/f", Send(ok_with(("Content-Length", "10"))))
    server.script("/big", Send(response(OK, [], b"")), Endless(b"x" * 4096))
    fetcher = TufFetcher(HttpTransport(timeout_s=5), deadline_s=2.0)
    assert fetcher.download_bytes(server.url + "/f", max_length=1000) == BODY
    with within(2), pytest.raises(tuf_exc.DownloadLengthMismatchError):
        fetcher.download_bytes(server.url + "/big", max_length=100_000)


# --- end to end: a real Agent against the hostile server on the metadata path ------------

def test_agent_survives_hostile_metadata_and_installs_next_cycle(tmp_path, caplog):
    """Cycle 1: timestamp.json headers trickled, then (retry) a '²' Content-Length; the
    long-running loop logs a typed DownloadError within its deadlines and cycle 2,
    served honestly, installs the packet."""
    rig = Rig(tmp_path)
    rig.publish(rig.packet("a", 1))
    with HostileServer(root=rig.repo_dir) as srv:
        srv.script("/metadata/timestamp.json",
                   Trickle(ok_with(("Content-Length", "10")), every_s=0.2), times=1)
        agent = rig.agent(url=srv.url, transport=HttpTransport(timeout_s=5, max_fetch_s=1.5),
                          retry=RetryPolicy(attempts=2, base_s=0.01))
        sleeps: list[float] = []

        def sleep(delay: float) -> None:  # the agent's sleeps, recorded; after the first
            if not sleeps:                # (the backoff in cycle 1) the retry is malformed
                srv.script("/metadata/timestamp.json",
                           Send(response(OK, [(b"Content-Length", b"\xb2")], BODY)), times=1)
            sleeps.append(delay)

        agent.sleep = sleep
        first = time.monotonic()
        with caplog.at_level("WARNING", logger="solar_edge.agent"):
            outcomes = agent.run(cycles=2, keep_going=True)
        assert time.monotonic() - first < 6.0
    logged = [r.getMessage() for r in caplog.records]
    assert any("retry 1" in m and "too slow" in m for m in logged), logged  # the trickle
    failed = [m for m in logged if "update cycle 1 failed" in m]
    assert failed and "DownloadError" in failed[0] and "not a byte count" in failed[0], logged
    assert not any("update cycle 2 failed" in m for m in logged)
    assert [(o.adapter_id, o.action) for o in outcomes] == [("a", "installed")]
    timestamp = [p for p, _ in srv.requests if p == "/metadata/timestamp.json"]
    assert len(timestamp) == 3


def test_agent_metadata_deadline_bounds_a_trickled_metadata_file(tmp_path):
    """AgentConfig.metadata_deadline_s reaches the TUF fetcher: trickled timestamp.json
    headers end the cycle with our SlowRetrievalError (not a plain DownloadError) in time."""
    rig = Rig(tmp_path)
    rig.publish(rig.packet("a", 1))
    with HostileServer(root=rig.repo_dir) as srv:
        srv.script("/metadata/timestamp.json",
                   Trickle(ok_with(("Content-Length", "10")), every_s=0.2), times=1)
        agent = rig.agent(url=srv.url, transport=HttpTransport(timeout_s=30),
                          metadata_deadline_s=1.0)
        first = time.monotonic()
        with pytest.raises(SlowRetrievalError):
            agent.check_once()
        assert time.monotonic() - first < 3.0
