"""The repository server against hostile clients on loopback: slow senders, slow readers,
malformed paths. Real sockets throughout; nothing is mocked."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

import pytest

from solar_edge.devices.fetcher import HttpTransport
from solar_edge.devices.intake import header_end
from solar_edge.devices.server import MAX_SEGMENTS, RepoServer, clean_path

SLOW_CLIENTS = 300


def _fd_room(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, ulimit -n allows {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture()
def root(tmp_path):
    data = os.urandom(200_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob.bin").write_bytes(data)
    return tmp_path, data


class Slowloris:
    """``n`` connections that send a partial request, then one more header byte at a time."""

    def __init__(self, port: int, n: int, every_s: float = 0.3) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /sub/blob.bin HTTP/1.1\r\nHost: x\r\nX-a: ")
            self.socks.append(s)
        self.every_s = every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(self.every_s):
            for s in self.socks:
                try:
                    s.send(b"a")
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def _timed_get(url: str) -> tuple[bytes, float]:
    start = time.monotonic()
    body = b"".join(HttpTransport(timeout_s=10).get(url).chunks)
    return body, time.monotonic() - start


def test_a_normal_client_is_served_while_hundreds_trickle_headers(root, capfd):
    tmp, data = root
    _fd_room(2 * SLOW_CLIENTS + 256)
    with RepoServer(tmp) as server:
        loris = Slowloris(server.server_address[1], SLOW_CLIENTS)
        try:
            time.sleep(0.5)
            assert server.intake.open_connections >= SLOW_CLIENTS   # all of them held open
            for _ in range(3):
                body, elapsed = _timed_get(server.url + "/sub/blob.bin")
                assert body == data and elapsed < 2.0, elapsed
        finally:
            loris.close()
    assert capfd.readouterr().err == ""


def test_over_the_connection_cap_the_longest_waiting_header_sender_makes_room(root):
    tmp, data = root
    _fd_room(2 * SLOW_CLIENTS + 256)
    with RepoServer(tmp, max_connections=50) as server:
        loris = Slowloris(server.server_address[1], SLOW_CLIENTS)
        try:
            time.sleep(0.3)
            assert server.intake.open_connections <= 50
            body, elapsed = _timed_get(server.url + "/sub/blob.bin")
            assert body == data and elapsed < 2.0, elapsed
            assert server.intake.dropped["evicted"] >= SLOW_CLIENTS - 50
        finally:
            loris.close()


def test_headers_must_arrive_within_the_header_deadline(root):
    tmp, _ = root
    with RepoServer(tmp, header_timeout_s=0.5) as server:
        loris = Slowloris(server.server_address[1], 5, every_s=0.1)
        try:
            start = time.monotonic()
            while server.intake.open_connections and time.monotonic() - start < 5:
                time.sleep(0.05)
            elapsed = time.monotonic() - start
        finally:
            loris.close()
        assert server.intake.open_connections == 0 and 0.3 < elapsed < 1.5, elapsed
        assert server.intake.dropped["header timeout"] == 5


def test_an_oversized_header_block_is_431(root):
    tmp, _ = root
    with RepoServer(tmp) as server, socket.create_connection(server.server_address) as s:
        s.sendall(b"GET /sub/blob.bin HTTP/1.1\r\n" + b"X-pad: " + b"a" * 20_000 + b"\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 431 ")


def test_a_client_that_never_reads_is_cut_at_its_deadline(tmp_path):
    big = os.urandom(20_000_000)
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "small").write_bytes(b"ok")
    # deadline for the body: timeout_s + 20 MB * 8 / 80 Mbit/s = 2.5 s
    with RepoServer(tmp_path, timeout_s=0.5, min_send_bps=80_000_000) as server:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(server.server_address)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        assert _timed_get(server.url + "/small")[0] == b"ok"   # others are served meanwhile
        while server.intake.open_connections and time.monotonic() - start < 10:
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        assert server.intake.open_connections == 0 and 2.0 < elapsed < 4.5, elapsed
        got = 0
        s.settimeout(5)
        while chunk := s.recv(1 << 20):
            got += len(chunk)
        s.close()
        assert got < len(big)   # the connection was closed mid-body


def _exchange(port: int, paths: list[str]) -> list[bytes]:
    """Status lines of several requests on one kept-alive connection."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        for path in paths:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
            status = f.readline()
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
            out.append(status)
    return out


@pytest.mark.parametrize(("path", "status"), [
    ("/%00", 400), ("/sub/%00blob.bin", 400), ("/%0a", 400), ("/sub%5cblob.bin", 400),
    ("/%zz", 400), ("/%", 400), ("/%4", 400), ("/%ff%fe", 400),
    ("/" + "a/" * 5000 + "b", 400),             # thousands of segments
    ("/" + "x" * 10_000, 400),                  # very long
    ("/" + "a/" * (MAX_SEGMENTS - 1) + "b", 404),
    ("/" + "y" * 300, 404),                     # longer than a file name may be
    ("/sub/%62lob.bin", 200),                   # a valid escape still works
])
def test_malformed_paths_are_answered_without_a_traceback(root, capfd, path, status):
    tmp, _ = root
    with RepoServer(tmp) as server:
        first, after = _exchange(server.server_address[1], [path, "/sub/blob.bin"])
        assert first.startswith(f"HTTP/1.1 {status} ".encode()), first
        assert after.startswith(b"HTTP/1.1 200 ")   # the connection survived
        assert server.errors == []
    assert "Traceback" not in capfd.readouterr().err


def test_clean_path_and_header_end():
    assert clean_path("/a/b%20c?x=1") == ("a/b c", "")
    assert clean_path("/%00")[0] is None and "control" in clean_path("/%00")[1]
    assert clean_path("/%e9")[1] == "path is not UTF-8"
    head = b"GET / HTTP/1.1\r\nA: b\r\n\r\n"
    assert header_end(head + b"rest") == len(head)
    assert header_end(b"GET / HTTP/1.1\nA: b\n\n") == len(b"GET / HTTP/1.1\nA: b\n\n")
    assert header_end(b"GET / HTTP/1.1\r\nA: b\r\n") == -1
