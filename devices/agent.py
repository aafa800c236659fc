"""The device update agent: a bounded state machine from signed metadata to a serving adapter.

One cycle (:meth:`Agent.check_once`)::

    REFRESH   TUF ngclient refresh: root -> timestamp -> snapshot -> targets, verified
              (forged, rolled-back, expired or mixed metadata is rejected here)
    SELECT    newest version per adapter id; older than installed -> RollbackError
    DOWNLOAD  resumable (partial file + HTTP Range), never more than the signed length
    VERIFY    length and SHA-256 against TUF; metadata == packet header (after STAGE)
    STAGE     the runtime verifies (signature, fields, base model, version: the one
              rollback check), decodes and health-probes the packet, without serving it
    ACTIVATE  serve it, if it updates the serving adapter or nothing serves yet
    COMMIT    state.json written atomically; only now does a restart use the new packet;
              any failure before restores exactly the committed set

A kill at any point restarts into the committed state: :meth:`Agent.start` re-applies
exactly the stored packets the state names. Transport failures are retried with bounded
exponential backoff (:meth:`Agent.run`); the runtime keeps serving meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater

from solar_edge.devices.applier import Applier
from solar_edge.devices.fetcher import (
    DownloadPolicy,
    HttpTransport,
    Transport,
    TufFetcher,
    download_resumable,
)
from solar_edge.devices.state import AgentState, Installed, StateStore
from solar_edge.errors import (
    DownloadError,
    IntegrityError,
    LimitExceededError,
    MetadataExpiredError,
    MetadataRollbackError,
    MetadataSignatureError,
    PacketError,
    RepositoryError,
    RollbackError,
    RuntimeApplyError,
    SolarEdgeError,
    UnknownAdapterError,
)

log = logging.getLogger("solar_edge.agent")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between cycles when the server is unreachable: bounded in count and delay."""

    attempts: int = 6
    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, failure: int) -> float:
        return min(self.max_s, self.base_s * 2 ** (failure - 1))


@dataclass
class AgentConfig:
    server_url: str
    state_dir: Path
    trusted_root: bytes | None = None   # provisioned root.json; None: the cached one
    max_packet_bytes: int = 16 << 20
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class Outcome:
    """What happened to one adapter id in one cycle."""

    adapter_id: str
    version: int
    action: str                  # "installed", "current", "rejected", "failed"
    error: SolarEdgeError | None = None
    seconds: float = 0.0         # download + verify + apply + health check
    bytes: int = 0
    download_s: float = 0.0      # transfer incl. resumes and backoff, and hash check
    apply_s: float = 0.0         # packet verify, runtime apply, health check, commit

    def __str__(self) -> str:
        why = f" ({type(self.error).__name__}: {self.error})" if self.error else ""
        timing = (f" [{self.bytes} B, download {self.download_s:.2f} s, apply "
                  f"{self.apply_s:.2f} s]" if self.action == "installed" else "")
        return f"{self.adapter_id} v{self.version}: {self.action}{why}{timing}"


_TUF_ERRORS: list[tuple[type[Exception], type[RepositoryError]]] = [
    (tuf_exc.UnsignedMetadataError, MetadataSignatureError),
    (tuf_exc.ExpiredMetadataError, MetadataExpiredError),
    (tuf_exc.BadVersionNumberError, MetadataRollbackError),
    (tuf_exc.LengthOrHashMismatchError, IntegrityError),
]


def _translate(exc: Exception) -> SolarEdgeError:
    """python-tuf errors -> solar-edge's typed errors (caller raises ``from exc``)."""
    for tuf_type, ours in _TUF_ERRORS:
        if isinstance(exc, tuf_type):
            return ours(str(exc))
    if isinstance(exc, tuf_exc.DownloadError):
        return DownloadError(str(exc))
    return RepositoryError(f"{type(exc).__name__}: {exc}")


class Agent:
    def __init__(self, config: AgentConfig, applier: Applier, transport: Transport | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 hook: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.applier = applier
        self.transport = transport or HttpTransport()
        self.sleep = sleep
        self.hook = hook or (lambda phase: None)
        self.store = StateStore(config.state_dir)
        self.state = AgentState()
        self.base = config.server_url.rstrip("/")

    # --- start-up ----------------------------------------------------------------------

    def start(self) -> AgentState:
        """Load the committed state and bring the runtime to exactly it."""
        self.state = self.store.load()
        packets = [self.store.read_packet(inst.sha256) for _, inst in
                   sorted(self.state.adapters.items())]
        self.applier.restore(packets, self.state.active)
        self.hook("restored")
        return self.state

    # --- one cycle ---------------------------------------------------------------------

    def _updater(self) -> Updater:
        meta = self.store.metadata
        bootstrap = self.config.trusted_root
        if (meta / "root.json").exists():
            bootstrap = None  # the cached root chain is newer than the provisioned one
        elif bootstrap is None:
            raise RepositoryError("no trusted root: provision the device with the repo's root.json")
        return Updater(str(meta), f"{self.base}/metadata/", str(self.store.partial),
                       f"{self.base}/targets/", fetcher=TufFetcher(self.transport),
                       bootstrap=bootstrap)

    def refresh(self) -> tuple[Updater, dict[str, list[TargetFile]]]:
        """Verified metadata, and the listed targets grouped by adapter id."""
        updater = self._updater()
        try:
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise _translate(exc) from exc
        # refresh() persists targets.json only after verifying it: safe to list from.
        signed = Metadata[Targets].from_file(str(self.store.metadata / "targets.json")).signed
        listed = signed.targets
        by_id: dict[str, list[TargetFile]] = {}
        for info in listed.values():
            custom = info.custom
            if not isinstance(custom.get("adapter_id"), str) or \
                    not isinstance(custom.get("version"), int):
                continue
            by_id.setdefault(custom["adapter_id"], []).append(info)
        self.hook("refreshed")
        return updater, by_id

    def check_once(self) -> list[Outcome]:
        """One REFRESH..COMMIT cycle over every adapter id the repository lists."""
        self.state = self.store.load()
        updater, by_id = self.refresh()
        outcomes = []
        for adapter_id in sorted(by_id):
            best = max(by_id[adapter_id], key=lambda t: t.custom["version"])
            outcomes.append(self._consider(updater, adapter_id, best))
        for outcome in outcomes:
            log.info("%s", outcome)
        return outcomes

    def _consider(self, updater: Updater, adapter_id: str, listed: TargetFile) -> Outcome:
        version = int(listed.custom["version"])
        installed = self.state.adapters.get(adapter_id)
        if installed is not None and version == installed.version:
            return Outcome(adapter_id, version, "current")
        if installed is not None and version < installed.version:
            err = RollbackError(f"repository offers v{version}, device has v{installed.version}",
                                field="header.adapter_version")
            return Outcome(adapter_id, version, "rejected", err)
        info = updater.get_targetinfo(listed.path)
        if info is None:
            return Outcome(adapter_id, version, "failed", RepositoryError("target vanished"))
        sha = info.hashes["sha256"]
        if sha in self.state.rejected:
            return Outcome(adapter_id, version, "rejected",
                           PacketError(f"rejected before: {self.state.rejected[sha]}"))
        start = time.monotonic()
        downloaded = start
        try:
            data = self._download(info)
            downloaded = time.monotonic()
            self._install(adapter_id, version, data)
        except (PacketError, RuntimeApplyError, RepositoryError) as exc:
            if isinstance(exc, (PacketError, RuntimeApplyError)):
                self.state.rejected[sha] = f"{type(exc).__name__}: {exc}"
                self.store.save(self.state)
            return Outcome(adapter_id, version, "rejected", exc, time.monotonic() - start)
        end = time.monotonic()
        return Outcome(adapter_id, version, "installed", None, end - start, info.length,
                       downloaded - start, end - downloaded)

    def _download(self, info: TargetFile) -> bytes:
        if info.length > self.config.max_packet_bytes:
            raise LimitExceededError(f"packet of {info.length} bytes exceeds the device limit "
                                     f"{self.config.max_packet_bytes}")
        sha = info.hashes["sha256"]
        parent, name = info.path.rsplit("/", 1)
        url = f"{self.base}/targets/{parent}/{sha}.{name}"
        part = self.store.partial / f"{sha}.part"
        self.hook("downloading")
        download_resumable(self.transport, url, part, info.length, self.config.download,
                           sleep=self.sleep, on_progress=lambda n: self.hook("chunk"))
        data = part.read_bytes()
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as exc:
            part.unlink(missing_ok=True)  # do not resume from corrupt bytes
            raise IntegrityError(f"{info.path}: {exc}") from exc
        self.hook("verified")
        return data

    def _install(self, adapter_id: str, version: int, data: bytes) -> None:
        old = AgentState(dict(self.state.adapters), self.state.active, dict(self.state.rejected))
        facts = self.applier.stage(data)  # the packet's one verification, decode and probe
        self.hook("staged")
        try:
            if facts.adapter_id != adapter_id or facts.version != version:
                raise RepositoryError(f"metadata says {adapter_id} v{version}, packet says "
                                      f"{facts.adapter_id} v{facts.version} (mix-and-match)")
            sha = self.store.store_packet(data)
            self.hook("stored")
            serve = old.active in (None, adapter_id)  # a new id does not take over serving
            if serve:
                self.applier.activate(adapter_id)
                self.hook("activated")
            self.state.adapters[adapter_id] = Installed(version, sha)
            if serve:
                self.state.active = adapter_id
            self.store.save(self.state)
        except BaseException:
            self.state = old
            self.applier.restore([self.store.read_packet(i.sha256)
                                  for _, i in sorted(old.adapters.items())], old.active)
            self.hook("rolled-back")
            raise
        self.hook("committed")
        self.store.prune_packets(self.state)
        (self.store.partial / f"{sha}.part").unlink(missing_ok=True)

    # --- loop with backoff -------------------------------------------------------------

    def run(self, cycles: int = 1, interval_s: float = 0.0,
            keep_going: bool = False) -> list[Outcome]:
        """Run ``cycles`` cycles; each retries an unreachable server with bounded backoff.

        A cycle that exhausts its attempts raises its DownloadError; repository errors
        (forged, expired, rolled-back metadata) are not retried within a cycle, since
        waiting does not fix them. With ``keep_going`` (a long-running agent) such a
        cycle is logged and the next one starts after ``interval_s``; the runtime keeps
        serving the committed adapter throughout.
        """
        outcomes: list[Outcome] = []
        for cycle in range(cycles):
            if cycle:
                self.sleep(interval_s)
            try:
                outcomes += self._cycle_with_backoff()
            except (DownloadError, RepositoryError) as exc:
                if not keep_going:
                    raise
                log.error("update cycle %d failed: %s: %s", cycle + 1, type(exc).__name__, exc)
        return outcomes

    def _cycle_with_backoff(self) -> list[Outcome]:
        for failure in range(1, self.config.retry.attempts + 1):
            try:
                return self.check_once()
            except DownloadError as exc:
                if failure == self.config.retry.attempts:
                    raise
                delay = self.config.retry.delay(failure)
                log.warning("server unreachable (%s); retry %d in %.1fs", exc, failure, delay)
                self.hook("backoff")
                self.sleep(delay)
        raise AssertionError("unreachable: attempts >= 1")

    def switch(self, adapter_id: str | None) -> None:
        """Serve another installed adapter and remember it across restarts."""
        if adapter_id is not None and adapter_id not in self.state.adapters:
            raise UnknownAdapterError(f"adapter {adapter_id!r} is not installed")
        self.applier.activate(adapter_id)
        self.state.active = adapter_id
        self.store.save(self.state)
