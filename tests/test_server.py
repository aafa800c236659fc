"""The repository HTTP server and client on loopback: Range, errors, drops, throttle."""

from __future__ import annotations

import http.client
import os
import time

import pytest

from solar_edge.devices.fetcher import HTTPStatusError, HttpTransport
from solar_edge.devices.server import RepoServer, parse_range
from solar_edge.errors import DownloadError
from solar_edge.profiles.links import LinkProfile, transfer_time


@pytest.fixture()
def served(tmp_path):
    data = os.urandom(200_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob.bin").write_bytes(data)
    (tmp_path / "sub" / "1.root.json").write_text("{}")
    (tmp_path.parent / "secret.txt").write_text("outside the root")
    with RepoServer(tmp_path) as server:
        yield server, data


def _raw(server, path, headers=None, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 10, None),
    ("bytes=0-", 10, (0, 9)),
    ("bytes=3-5", 10, (3, 5)),
    ("bytes=3-100", 10, (3, 9)),
    ("bytes=-4", 10, (6, 9)),
    ("bytes=-40", 10, (0, 9)),
    ("bytes=1-2,4-5", 10, None),   # multi-range: whole file
    ("items=1-2", 10, None),
])
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=5-3", "bytes=-0"])
def test_parse_range_unsatisfiable(header):
    with pytest.raises(ValueError):
        parse_range(header, 10)


def test_whole_file_and_ranges(served):
    server, data = served
    resp, body = _raw(server, "/sub/blob.bin")
    assert resp.status == 200 and body == data
    assert resp.getheader("Accept-Ranges") == "bytes"
    assert resp.getheader("Content-Type") == "application/octet-stream"
    resp, body = _raw(server, "/sub/1.root.json")
    assert body == b"{}" and resp.getheader("Content-Type") == "application/json"
    resp, body = _raw(server, "/sub/blob.bin", {"Range": "bytes=1000-1999"})
    assert resp.status == 206 and body == data[1000:2000]
    assert resp.getheader("Content-Range") == f"bytes 1000-1999/{len(data)}"
    resp, body = _raw(server, "/sub/blob.bin", {"Range": f"bytes={len(data)}-"})
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{len(data)}"
    resp, body = _raw(server, "/sub/blob.bin", method="HEAD")
    assert resp.status == 200 and body == b"" and int(resp.getheader("Content-Length")) == len(data)


@pytest.mark.parametrize("path", ["/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt",
                                  "/sub", "/", "/missing", "/sub//blob.bin"])
def test_no_escape_no_listing(served, path):
    server, _ = served
    resp, body = _raw(server, path)
    assert resp.status == 404 and b"outside" not in body


def test_client_resumes_with_range(served):
    server, data = served
    body = HttpTransport().get(server.url + "/sub/blob.bin", start=123_456)
    assert (body.offset, body.total) == (123_456, len(data))
    assert b"".join(body.chunks) == data[123_456:]
    with pytest.raises(HTTPStatusError) as err:
        HttpTransport().get(server.url + "/nope")
    assert err.value.status == 404


def test_dropped_connection_is_a_download_error(served):
    server, data = served
    server.faults.drop("/sub/blob.bin", 70_000)
    body = HttpTransport().get(server.url + "/sub/blob.bin")
    got = bytearray()
    with pytest.raises(DownloadError, match="after 70000 of 200000"):
        for chunk in body.chunks:
            got += chunk
    assert bytes(got) == data[:70_000]
    assert b"".join(HttpTransport().get(server.url + "/sub/blob.bin").chunks) == data


def test_server_down_is_a_download_error(tmp_path):
    server = RepoServer(tmp_path).start()
    url = server.url
    server.stop()
    with pytest.raises(DownloadError):
        HttpTransport(timeout_s=2).get(url + "/x")


def test_throttle_follows_the_link_model(tmp_path):
    link = LinkProfile("test", "tcp", rate_bps=400_000, latency_s=0.05, loss=0.0, mtu=1500)
    data = os.urandom(40_000)
    (tmp_path / "f").write_bytes(data)
    with RepoServer(tmp_path, link=link) as server:
        start = time.monotonic()
        got = b"".join(HttpTransport().get(server.url + "/f").chunks)
        elapsed = time.monotonic() - start
    assert got == data
    expected = transfer_time(len(data), link)   # ~1.0 s
    assert expected * 0.9 < elapsed < expected * 1.5


def test_a_link_without_tcp_cannot_throttle_a_server(tmp_path):
    from solar_edge.errors import ProfileError
    from solar_edge.profiles.links import get_link

    with pytest.raises(ProfileError, match="no HTTP/TCP"):
        RepoServer(tmp_path, link=get_link("lorawan"))
