"""A real static server, not ours: nginx (distribution package) serves a published TUF
repository on loopback; an agent installs through it, and a download cut mid-body is
resumed with Range (nginx answers 206). Skips when nginx is not installed; CI installs it."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading

import pytest
from ota_rig import Rig

from solar_edge.devices.fetcher import HttpTransport
from solar_edge.devices.nginx import Nginx, nginx_binary, read_access_log

if nginx_binary() is None and os.environ.get("SOLAR_EDGE_REQUIRE_NGINX"):
    raise RuntimeError("SOLAR_EDGE_REQUIRE_NGINX is set (CI) but nginx is not installed")
pytestmark = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (apt-get install -y nginx)")
CUT_AT = 100_000


class CuttingProxy:
    """A loopback TCP proxy that forwards the first response for ``path`` only up to its
    header block plus ``body_bytes``, then closes both sides (a link lost mid-download)."""

    def __init__(self, upstream_port: int, path: str, body_bytes: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.path, self.body_bytes, self.cuts = path.encode(), body_bytes, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as up:
            request = client.recv(65536)
            cut = self.cuts == 0 and b" " + self.path + b" " in request
            if cut:
                self.cuts += 1
            up.sendall(request)
            budget, head = None, b""
            while data := up.recv(65536):
                if cut and budget is None:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    budget, data = self.body_bytes, head
                    client.sendall(data[:end + 4])
                    data = data[end + 4:]
                if budget is not None:
                    client.sendall(data[:budget])
                    budget -= min(budget, len(data))
                    if budget == 0:
                        return
                else:
                    client.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture()
def served(tmp_path):
    rig = Rig(tmp_path)
    packet = rig.packet("a", 1, pad=300_000)
    rig.publish(packet)
    with Nginx(rig.repo_dir, tmp_path / "nginx") as nginx:
        yield rig, packet, nginx


def test_an_agent_installs_through_nginx_and_resumes_a_cut_download(served):
    rig, packet, nginx = served
    path = "/" + rig.target_file(packet, "a", 1).relative_to(rig.repo_dir).as_posix()
    proxy = CuttingProxy(nginx.port, path, CUT_AT)
    try:
        agent = rig.agent(url=proxy.url)
        [outcome] = agent.run()
    finally:
        proxy.close()
    assert outcome.action == "installed", outcome
    assert proxy.cuts == 1
    assert agent.applier.staged == [hashlib.sha256(packet).hexdigest()]
    hits = [a for a in read_access_log(nginx.access_log) if a.path == path]
    assert [(a.status, a.range) for a in hits] == [(200, ""), (206, f"bytes={CUT_AT}-")]
    assert hits[1].body_bytes == len(packet) - CUT_AT
    assert {a.path for a in nginx.accesses()} >= {"/metadata/timestamp.json", path}


def test_nginx_answers_range_and_caches_only_the_timestamp_briefly(served):
    rig, packet, nginx = served
    path = "/" + rig.target_file(packet, "a", 1).relative_to(rig.repo_dir).as_posix()
    body = HttpTransport(timeout_s=5).get(nginx.url + path, start=123_456)
    assert (body.offset, body.total) == (123_456, len(packet))
    assert b"".join(body.chunks) == packet[123_456:]
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=5)
    headers = {}
    for p in ("/metadata/timestamp.json", path):
        conn.request("HEAD", p)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        headers[p] = resp.getheader("Cache-Control")
    conn.close()
    assert headers["/metadata/timestamp.json"] == "public, max-age=10"
    assert "immutable" in headers[path]
