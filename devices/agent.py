"""The device update agent: a bounded state machine from signed metadata to a serving adapter.

One cycle (:meth:`Agent.check_once`)::

    REFRESH   TUF ngclient refresh: root -> timestamp -> snapshot -> targets, verified
              (forged, rolled-back, expired or mixed metadata is rejected here)
    SELECT    every listed target is checked first (hash, id, path: packetinfo.listed_target;
              an unusable one is "rejected", the others still count); per adapter id the
              newest version that the operator's pin allows and whose staged rollout
              includes this device (devices/rollout.py); older than installed -> RollbackError
    DOWNLOAD  resumable (partial file + HTTP Range), never more than the signed length
    VERIFY    length and SHA-256 against TUF; metadata == packet header (after STAGE)
    STAGE     the runtime verifies (signature, fields, base model, version: the one
              rollback check), decodes and health-probes the packet, without serving it
    ACTIVATE  serve it, if it updates the serving adapter or nothing serves yet
    COMMIT    state.json written atomically; only now does a restart use the new packet;
              any failure before restores exactly the committed set

A kill at any point restarts into the committed state: :meth:`Agent.start` re-applies
exactly the stored packets the state names. Transport failures are retried with bounded
exponential backoff (:meth:`Agent.run`); the runtime keeps serving meanwhile. After every
cycle the agent writes ``status.json`` and, if configured, POSTs it (devices/report.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater

from solar_edge.devices.applier import Applier
from solar_edge.devices.fetcher import (
    DownloadPolicy,
    HttpTransport,
    Transport,
    TufFetcher,
    check_http_url,
    download_resumable,
    translate_tuf_error,
)
from solar_edge.devices.packetinfo import ListedTarget, listed_target
from solar_edge.devices.recovery import clean_partials, heal_state
from solar_edge.devices.report import Outcome, Reporter, exit_code, status_doc
from solar_edge.devices.selection import select_versions
from solar_edge.devices.state import AgentState, Installed, StateStore
from solar_edge.errors import (
    DownloadError,
    IntegrityError,
    LimitExceededError,
    PacketError,
    RepositoryError,
    RuntimeApplyError,
    SolarEdgeError,
    StateError,
    UnknownAdapterError,
)
from solar_edge.format.ids import ID_RULE, is_valid_id

__all__ = ["Agent", "AgentConfig", "Outcome", "RetryPolicy"]

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
    device_id: str | None = None     # None: generated once, kept in STATE_DIR/device_id
    report_url: str | None = None    # POST status.json here after every cycle (best effort)
    report_timeout_s: float = 5.0
    metadata_deadline_s: float = 60.0  # one TUF metadata file, headers included


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
        if config.device_id is not None and not is_valid_id(config.device_id):
            raise StateError(f"device id {config.device_id!r:.80} does not follow the id rule "
                             f"({ID_RULE})")
        self.device_id: str = config.device_id or self.store.device_id() or ""
        self.reporter = Reporter(config.report_url, config.report_timeout_s) \
            if config.report_url else None
        self.state = AgentState()
        self._applied: tuple[dict[str, Installed], str | None] = ({}, None)
        self.last_outcomes: list[Outcome] = []
        self.last_error: SolarEdgeError | None = None
        self.base = config.server_url.rstrip("/")
        self._fetcher: TufFetcher | None = None
        if isinstance(self.transport, HttpTransport):   # a setting no retry can mend
            check_http_url(self.base)

    @property
    def exit_code(self) -> int:
        """Of the last cycle: 0 all current/installed, 1 some rejected/failed, 2 cycle failed."""
        return exit_code(self.last_outcomes, self.last_error)

    # --- start-up ----------------------------------------------------------------------

    def start(self) -> AgentState:
        """Load the committed state, heal damaged stored packets, bring the runtime to it."""
        with self.store.locked():
            self.state = heal_state(self.store, self.store.load())
            self._restore(self.state)
            clean_partials(self.store)
        self.hook("restored")
        return self.state

    def _restore(self, state: AgentState) -> None:
        packets = [self.store.read_packet(inst.sha256) for _, inst in
                   sorted(state.adapters.items())]
        self.applier.restore(packets, state.active)
        self._applied = (dict(state.adapters), state.active)

    # --- one cycle ---------------------------------------------------------------------

    def _updater(self) -> Updater:
        meta = self.store.metadata

        def make(bootstrap: bytes | None) -> Updater:
            fetcher = self._fetcher = TufFetcher(self.transport,
                                                 self.config.metadata_deadline_s)
            return Updater(str(meta), f"{self.base}/metadata/", str(self.store.partial),
                           f"{self.base}/targets/", fetcher=fetcher, bootstrap=bootstrap)

        provisioned = self.config.trusted_root
        cached = meta / "root.json"
        if cached.exists():
            try:
                return make(None)  # the cached root chain is newer than the provisioned one
            except (tuf_exc.RepositoryError, OSError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                if provisioned is None:
                    raise RepositoryError(f"cached {cached} is unusable ({why}) and no root is "
                                          f"provisioned: provision the repo's root.json") from exc
                log.warning("cached %s is unusable (%s); falling back to the provisioned root",
                            cached, why)
                cached.unlink(missing_ok=True)
        elif provisioned is None:
            raise RepositoryError("no trusted root: provision the device with the repo's root.json")
        try:
            return make(provisioned)
        except (tuf_exc.RepositoryError, OSError) as exc:
            raise RepositoryError(f"the provisioned root is unusable: {type(exc).__name__}: "
                                  f"{exc}") from exc

    def refresh(self) -> tuple[Updater, dict[str, list[ListedTarget]], list[Outcome]]:
        """Verified metadata; the usable targets grouped by adapter id; the unusable ones."""
        updater = self._updater()
        try:
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            err = translate_tuf_error(exc)
            url = self._fetcher.last_url if self._fetcher is not None else None
            if isinstance(exc, tuf_exc.RepositoryError) and url and url not in str(err):
                err = type(err)(f"{err} (in {url})")
            raise err from exc
        # refresh() persists targets.json only after verifying it: safe to list from.
        signed = Metadata[Targets].from_file(str(self.store.metadata / "targets.json")).signed
        by_id: dict[str, list[ListedTarget]] = {}
        unusable = []
        for path, info in sorted(signed.targets.items()):
            custom = info.custom if isinstance(info.custom, dict) else {}
            if "adapter_id" not in custom and "version" not in custom:
                continue   # not an adapter packet: never fetched, never named in a path
            try:
                target = listed_target(path, info)
            except RepositoryError as exc:
                name, version = custom.get("adapter_id"), custom.get("version")
                unusable.append(Outcome(name if is_valid_id(name) else repr(path)[:80],
                                        version if type(version) is int else 0,
                                        "rejected", exc))
                continue
            by_id.setdefault(target.adapter_id, []).append(target)
        self.hook("refreshed")
        return updater, by_id, unusable

    def check_once(self) -> list[Outcome]:
        """One REFRESH..COMMIT cycle over every adapter id the repository lists, holding the
        state folder's lock (operator commands wait for it)."""
        with self.store.locked():
            return self._check_once()

    def _check_once(self) -> list[Outcome]:
        state = self.store.load()
        if (state.adapters, state.active) != self._applied:
            log.warning("state.json changed outside the agent (an operator command); "
                        "the runtime now follows it")
            state = heal_state(self.store, state)
            self._restore(state)
        self.state = state
        updater, by_id, outcomes = self.refresh()
        for adapter_id in sorted(by_id):
            candidates, decided = self._select(adapter_id, by_id[adapter_id])
            for target in candidates:   # newest first; stop at the first that installs
                outcomes.append(self._consider(updater, target))
                if outcomes[-1].action == "installed":
                    break
            outcomes += decided
        for outcome in outcomes:
            log.info("%s", outcome)
        return outcomes

    def _select(self, adapter_id: str,
                listed: list[ListedTarget]) -> tuple[list[ListedTarget], list[Outcome]]:
        installed = self.state.adapters.get(adapter_id)
        return select_versions(adapter_id, listed, installed.version if installed else 0,
                               self.state.pinned.get(adapter_id), self.device_id)

    def _trust_tag(self) -> str:
        """Names the trusted packet keys a rejection was judged under (applier's trust_tag)."""
        return str(getattr(self.applier, "trust_tag", ""))

    def _rejected_before(self, sha: str) -> str | None:
        """The cached reason for this packet, if it was rejected under the same trusted keys."""
        entry = self.state.rejected.get(sha)
        prefix = f"[keys {self._trust_tag()}] "
        return entry[len(prefix):] if entry is not None and entry.startswith(prefix) else None

    def _consider(self, updater: Updater, listed: ListedTarget) -> Outcome:
        """Download, verify and install one target. Only what the packet's own bytes decide
        (signature, decoding, base, health, rollback) is cached against its hash; what the
        metadata claims (length, limits) and transfer failures are retried next cycle."""
        adapter_id, version, sha = listed.adapter_id, listed.version, listed.sha256
        reason = self._rejected_before(sha)
        if reason is not None:
            return Outcome(adapter_id, version, "rejected",
                           PacketError(f"rejected before: {reason}"))
        start = time.monotonic()
        part = self.store.partial / f"{sha}.part"
        try:
            data = self._download(updater, listed)
        except (DownloadError, PacketError, RepositoryError) as exc:
            if part.exists() and part.stat().st_size == 0:
                part.unlink()
            action = "failed" if isinstance(exc, DownloadError) else "rejected"
            return Outcome(adapter_id, version, action, exc, time.monotonic() - start)
        downloaded = time.monotonic()
        try:
            self._install(adapter_id, version, data)
        except (PacketError, RuntimeApplyError) as exc:
            self.state.rejected[sha] = f"[keys {self._trust_tag()}] {type(exc).__name__}: {exc}"
            self.store.save(self.state)
            return Outcome(adapter_id, version, "rejected", exc, time.monotonic() - start)
        except RepositoryError as exc:
            return Outcome(adapter_id, version, "rejected", exc, time.monotonic() - start)
        finally:
            part.unlink(missing_ok=True)   # verified bytes: installed, or rejected for good
        end = time.monotonic()
        return Outcome(adapter_id, version, "installed", None, end - start, listed.length,
                       downloaded - start, end - downloaded)

    def _download(self, updater: Updater, listed: ListedTarget) -> bytes:
        info = updater.get_targetinfo(listed.path)
        if info is None or info.hashes.get("sha256") != listed.sha256:
            raise RepositoryError(f"target {listed.path} vanished from the verified metadata")
        if listed.length > self.config.max_packet_bytes:
            raise LimitExceededError(f"packet of {listed.length} bytes exceeds the device limit "
                                     f"{self.config.max_packet_bytes}")
        # Only checked values reach the URL and the file name (packetinfo.listed_target).
        url = (f"{self.base}/targets/adapters/{listed.adapter_id}/{listed.sha256}."
               f"v{listed.version}.slr")
        part = self.store.partial / f"{listed.sha256}.part"
        self.hook("downloading")
        download_resumable(self.transport, url, part, listed.length, self.config.download,
                           sleep=self.sleep, on_progress=lambda n: self.hook("chunk"))
        data = part.read_bytes()
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as exc:
            part.unlink(missing_ok=True)  # do not resume from corrupt bytes
            raise IntegrityError(f"{listed.path}: {exc}") from exc
        self.hook("verified")
        return data

    def _install(self, adapter_id: str, version: int, data: bytes) -> None:
        old = self.state.copy()
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
            before = self.state.adapters.get(adapter_id)
            if before is not None:
                self.state.previous[adapter_id] = before   # kept for an operator's rollback
            self.state.adapters[adapter_id] = Installed(version, sha)
            if serve:
                self.state.active = adapter_id
            self.store.save(self.state)
        except BaseException:
            self.state = old
            self._restore(old)
            self.hook("rolled-back")
            raise
        self._applied = (dict(self.state.adapters), self.state.active)
        self.hook("committed")
        self.store.prune_packets(self.state)

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
                self.last_outcomes, self.last_error = self._cycle_with_backoff(), None
                outcomes += self.last_outcomes
            except (DownloadError, RepositoryError) as exc:
                self.last_outcomes, self.last_error = [], exc
                if not keep_going:
                    raise
                log.error("update cycle %d failed: %s: %s", cycle + 1, type(exc).__name__, exc)
            except SolarEdgeError as exc:   # e.g. a damaged state.json: reported, then raised
                self.last_outcomes, self.last_error = [], exc
                raise
            finally:
                self.report()
        return outcomes

    def report(self) -> dict[str, object]:
        """Write status.json for the last cycle and POST it if a report URL is configured."""
        doc = status_doc(self.device_id, self.state, self.last_outcomes, self.last_error)
        try:
            self.store.write_status(doc)
        except OSError as exc:   # a full disk must not stop updates
            log.warning("cannot write %s: %s", self.store.status_path, exc)
        if self.reporter is not None:
            self.reporter.send(doc)
        return doc

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
        with self.store.locked():
            self.applier.activate(adapter_id)
            self.state.active = adapter_id
            self.store.save(self.state)
            self._applied = (dict(self.state.adapters), self.state.active)
