"""Fleet simulation: hundreds of update agents against nginx, a staged rollout, reports.

    python bench/fleet.py [--agents 300] [--phases 0.1,0.5,1] [--concurrency 24]
                          [--foreign 0.02] [--out out/fleet]

A real nginx (devices/nginx.py) serves a TUF repository with one signed SOLAR packet
(adapter ``fleet-task`` v1). Each phase re-publishes the same bytes with a higher
``rollout`` fraction, then every agent runs one update cycle (threads, at most
``--concurrency`` at once): a device installs only if its ``rollout_bucket(device id,
adapter id, version)`` is below the fraction, otherwise its outcome is ``deferred``. A
``--foreign`` share of devices holds another base bundle, so the packet is ``rejected``
there (BaseMismatchError). Every agent writes ``status.json`` and POSTs it to a loopback
collector, from which the per-version census is taken.

Agents use :class:`VerifyingOnlyApplier`: it really decodes the packet and verifies its
Ed25519 signature with the solar_edge.format reader, checks base fingerprint and version,
but builds no ONNX Runtime session (hundreds of sessions are out of scope for 2 cores).

Per phase: devices, newly installed, deferred, rejected, devices on v1 so far, bytes
nginx sent (its access log: metadata and packets apart), wall time. Written as JSON and
Markdown. Time to full rollout: from the first phase's start to the end of the phase in
which the last eligible device installed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from solar_edge.devices.agent import Agent, AgentConfig, RetryPolicy
from solar_edge.devices.fetcher import DownloadPolicy, HttpTransport
from solar_edge.devices.nginx import Nginx, read_access_log
from solar_edge.devices.packetinfo import PacketFacts
from solar_edge.devices.repo import Repository, root_path, signer_from_key
from solar_edge.errors import BaseMismatchError, RollbackError, UnknownAdapterError
from solar_edge.format import signing
from solar_edge.format.packet import PacketHeader
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet

ADAPTER = "fleet-task"
BASE = hashlib.sha256(b"fleet simulation base bundle").digest()
OTHER_BASE = hashlib.sha256(b"another base bundle").digest()


class VerifyingOnlyApplier:
    """Applier that decodes and signature-verifies every packet (solar_edge.format reader),
    checks its base fingerprint and that its version is newer, and keeps the adapter id and
    version; it builds no ONNX Runtime session and runs no inference."""

    def __init__(self, trusted: Any, fingerprint: bytes) -> None:
        self.trusted = trusted
        self.fingerprint = fingerprint
        self.cache: dict[str, int] = {}
        self.active: str | None = None

    def stage(self, data: bytes) -> PacketFacts:
        header = decode_packet(data, trusted_keys=self.trusted).header
        if header.fingerprint != self.fingerprint:
            raise BaseMismatchError("packet is for another base bundle",
                                    field="header.fingerprint")
        if header.adapter_version <= self.cache.get(header.adapter_id, 0):
            raise RollbackError("not newer than the cached version", field="header.version")
        self.cache[header.adapter_id] = header.adapter_version
        return PacketFacts(header.adapter_id, header.adapter_version, header.fingerprint.hex(),
                           len(data), hashlib.sha256(data).hexdigest())

    def activate(self, adapter_id: str | None) -> None:
        if adapter_id is not None and adapter_id not in self.cache:
            raise UnknownAdapterError(adapter_id)
        self.active = adapter_id

    def restore(self, packets: Sequence[bytes], active: str | None) -> None:
        self.cache, self.active = {}, None
        for data in packets:
            self.stage(data)
        self.activate(active)


def make_packet(key: Any, version: int = 1, values: int = 4096) -> bytes:
    """A signed packet of ~``2 * values`` bytes: float16 bias deltas over four layers."""
    rng = np.random.default_rng(version)
    per = values // 4
    records = [LayerRecord(i, RecordKind.BIAS_DELTA, per, 1, 0,
                           QuantizedValues(ValueFormat.FLOAT16, per,
                                           raw=rng.standard_normal(per).astype(np.float16)))
               for i in range(4)]
    header = PacketHeader(BASE, ADAPTER, version, {"task": "fleet"})
    return encode_packet(header, CodecHeader(0), records, key)


class Collector(http.server.ThreadingHTTPServer):
    """Loopback report endpoint: keeps the latest status document per device."""

    daemon_threads = True
    request_queue_size = 256   # a burst of reports must not overflow the listen backlog

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.posts = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _CollectorHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/report"


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        doc = json.loads(self.rfile.read(min(length, 1 << 20)))
        with self.server.lock:
            self.server.latest[str(doc.get("device_id"))] = doc
            self.server.posts += 1
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _served_bytes(log: Path, since: int) -> tuple[dict[str, int], int]:
    """Bytes nginx sent after line ``since`` of its access log: metadata / packets."""
    lines = read_access_log(log)
    out = {"metadata": 0, "packets": 0, "requests": len(lines) - since, "206": 0}
    for a in lines[since:]:
        out["packets" if a.path.endswith(".slr") else "metadata"] += a.body_bytes
        out["206"] += a.status == 206
    return out, len(lines)


def simulate(work: Path, agents: int, phases: Sequence[float], concurrency: int,
             foreign: float) -> dict[str, Any]:
    key = signing.generate_private_key()
    packet = make_packet(key)
    repo_dir = work / "repo"
    repo = Repository(repo_dir, signer_from_key(key))
    trusted = [key.public_key()]
    n_foreign = round(agents * foreign)
    collector = Collector()
    threading.Thread(target=collector.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    rows: list[dict[str, Any]] = []
    with Nginx(repo_dir, work / "nginx") as nginx:
        repo.publish([packet], rollout=phases[0])
        root = root_path(repo_dir).read_bytes()
        fleet = []
        for i in range(agents):
            config = AgentConfig(nginx.url, work / "devices" / f"d{i:04d}", trusted_root=root,
                                 device_id=f"dev-{i:04d}", report_url=collector.url,
                                 download=DownloadPolicy(backoff_s=0.05),
                                 retry=RetryPolicy(attempts=3, base_s=0.05))
            fp = OTHER_BASE if i < n_foreign else BASE
            fleet.append(Agent(config, VerifyingOnlyApplier(trusted, fp),
                               HttpTransport(timeout_s=10)))
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda a: a.start(), fleet))
            log_pos, start, full_at = 0, time.monotonic(), None
            first_reject: dict[str, str] = {}   # device id -> error of its first rejection
            for n, fraction in enumerate(phases):
                if n:
                    repo.publish([packet], rollout=fraction)   # same bytes, wider rollout
                t0 = time.monotonic()
                outcomes = list(pool.map(lambda a: a.run()[0], fleet))
                elapsed = time.monotonic() - t0
                served, log_pos = _served_bytes(nginx.access_log, log_pos)
                actions = Counter(o.action for o in outcomes)
                for agent, o in zip(fleet, outcomes, strict=True):
                    if o.action == "rejected" and o.error is not None:
                        first_reject.setdefault(agent.device_id, type(o.error).__name__)
                on_v1 = sum(1 for a in fleet if a.state.adapters.get(ADAPTER) is not None)
                if full_at is None and on_v1 == agents - n_foreign:
                    full_at = time.monotonic() - start
                rows.append({"phase": n + 1, "rollout": fraction, "devices": agents,
                             "installed": actions["installed"], "deferred": actions["deferred"],
                             "rejected": actions["rejected"], "current": actions["current"],
                             "on_v1": on_v1, "seconds": round(elapsed, 2),
                             "bytes_metadata": served["metadata"],
                             "bytes_packets": served["packets"],
                             "requests": served["requests"]})
    collector.shutdown()
    census = Counter(str(d["installed"].get(ADAPTER, "none")) for d in collector.latest.values())
    statuses = [json.loads((a.config.state_dir / "status.json").read_text()) for a in fleet]
    status_census = Counter(str(s["installed"].get(ADAPTER, "none")) for s in statuses)
    rejected_why = Counter(first_reject.values())
    return {"agents": agents, "foreign_base": n_foreign, "concurrency": concurrency,
            "packet_bytes": len(packet), "phases": rows,
            "time_to_full_rollout_s": None if full_at is None else round(full_at, 2),
            "reports_received": collector.posts,
            "reports_failed": sum(a.reporter.failed for a in fleet if a.reporter is not None),
            "census_reports": dict(census),
            "census_status_files": dict(status_census), "rejected_by": dict(rejected_why),
            "rejected_devices": sorted(first_reject)}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Fleet: {result['agents']} agents ({result['foreign_base']} on another base), "
             f"{result['concurrency']} at a time, packet {result['packet_bytes']} B, nginx.",
             "",
             "| phase | rollout | devices | installed | deferred | rejected | on v1 | "
             "metadata bytes | packet bytes | requests | seconds |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["phases"]:
        lines.append(f"| {r['phase']} | {r['rollout']:g} | {r['devices']} | {r['installed']} | "
                     f"{r['deferred']} | {r['rejected']} | {r['on_v1']} | "
                     f"{r['bytes_metadata']} | {r['bytes_packets']} | {r['requests']} | "
                     f"{r['seconds']} |")
    lines += ["", f"Time to full rollout: {result['time_to_full_rollout_s']} s. "
              f"Reports received: {result['reports_received']} "
              f"({result['reports_failed']} failed); who is on which version "
              f"(latest report per device): {result['census_reports']}; from status.json: "
              f"{result['census_status_files']}; devices that rejected it, by first error: "
              f"{result['rejected_by']}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=300)
    ap.add_argument("--phases", default="0.1,0.5,1")
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--foreign", type=float, default=0.02,
                    help="share of devices on another base bundle (their install is rejected)")
    ap.add_argument("--out", type=Path, default=Path("out/fleet"))
    args = ap.parse_args(argv)
    phases = [float(p) for p in args.phases.split(",")]
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        result = simulate(Path(tmp), args.agents, phases, args.concurrency, args.foreign)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (args.out / "fleet.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
