"""Serve a repository folder with a real nginx (the distribution's package), for tests and
benchmarks: a generated config, loopback port, pid/log/temp paths in one work folder,
run as the current user in the foreground (``daemon off``).

The config is the hosting recipe of docs/hosting.md: every file is immutable (consistent
snapshots give each metadata version and each target a unique name) except
``metadata/timestamp.json``, which is served with a short cache lifetime. The access log
records, per request, the path, status, body bytes sent and the Range header, so callers
can count bytes served and see resumed downloads (:func:`read_access_log`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from solar_edge.errors import DownloadError

LOG_FORMAT = '$request_uri\\t$status\\t$body_bytes_sent\\t"$http_range"'


@dataclass(frozen=True)
class Access:
    """One access-log line: path, status, body bytes sent, Range header ('' if none)."""

    path: str
    status: int
    body_bytes: int
    range: str


def nginx_binary() -> str | None:
    """Path of the nginx executable, or None when it is not installed."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_config(root: Path, work: Path, port: int, limit_rate: int | None = None,
                  timestamp_max_age_s: int = 10) -> str:
    """nginx.conf text for serving ``root`` on 127.0.0.1:``port``."""
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.getuid() == 0 else ""
    temps = "\n".join(f"    {kind}_temp_path {work / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    rate = f"limit_rate {limit_rate};" if limit_rate else ""
    return f"""{user}
daemon off;
worker_processes 1;
pid {work / 'nginx.pid'};
error_log {work / 'error.log'} warn;
events {{ worker_connections 2048; }}
http {{
    log_format repo '{LOG_FORMAT}';
    access_log {work / 'access.log'} repo;
{temps}
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 15;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex off;
        location / {{
            {rate}
            add_header Cache-Control "public, max-age=31536000, immutable";
        }}
        location = /metadata/timestamp.json {{
            {rate}
            add_header Cache-Control "public, max-age={timestamp_max_age_s}";
        }}
    }}
}}
"""


class Nginx:
    """``with Nginx(repo_dir, work_dir) as n: n.url`` serves the folder until the block ends."""

    def __init__(self, root: str | Path, work: str | Path, limit_rate: int | None = None,
                 port: int | None = None) -> None:
        binary = nginx_binary()
        if binary is None:
            raise DownloadError("nginx is not installed (apt-get install -y nginx)")
        self.binary = binary
        self.root = Path(root).resolve()
        self.work = Path(work).resolve()
        self.limit_rate = limit_rate
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.work / "access.log"

    def start(self, timeout_s: float = 10.0) -> Nginx:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(render_config(self.root, self.work, self.port, self.limit_rate))
        self.proc = subprocess.Popen([self.binary, "-c", str(conf), "-p", str(self.work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise DownloadError(f"nginx exited at start: {err.strip()[:300]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise DownloadError(f"nginx did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()   # SIGTERM: fast shutdown of master and worker
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def accesses(self) -> list[Access]:
        return read_access_log(self.access_log)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_access_log(path: Path) -> list[Access]:
    """Parse the access log written with :data:`LOG_FORMAT` (missing file: no requests)."""
    out: list[Access] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        rng = parts[3].strip('"')
        out.append(Access(parts[0], int(parts[1]), int(parts[2]), "" if rng == "-" else rng))
    return out
