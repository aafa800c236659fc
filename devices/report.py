"""What one update cycle did, for the operator: outcomes, the exit code, status.json, a POST.

After every cycle the agent writes ``status.json`` in its state folder (atomically) with
:func:`status_doc` and, when a report URL is configured, POSTs the same JSON there with
:class:`Reporter`: best effort, bounded in time, a failure is logged and never stops the agent.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from solar_edge.devices.state import AgentState
from solar_edge.errors import SolarEdgeError

log = logging.getLogger("solar_edge.agent")

STATUS_FORMAT = 1
OK_ACTIONS = ("installed", "current", "deferred", "pinned")
EXIT_OK, EXIT_REJECTED, EXIT_REPOSITORY = 0, 1, 2


@dataclass
class Outcome:
    """What happened to one adapter id (or one unusable listed target) in one cycle.

    ``action``: ``installed``, ``current`` (the newest allowed version is installed),
    ``deferred`` (a newer version's rollout does not include this device yet), ``pinned``
    (a newer version is listed but an operator pinned the id), ``rejected``."""

    adapter_id: str
    version: int
    action: str
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


def outcome_row(o: Outcome) -> dict[str, Any]:
    return {"adapter_id": o.adapter_id, "version": o.version, "action": o.action,
            "error": None if o.error is None else f"{type(o.error).__name__}: {o.error}",
            "bytes": o.bytes, "download_s": round(o.download_s, 3),
            "apply_s": round(o.apply_s, 3)}


def exit_code(outcomes: Sequence[Outcome], error: SolarEdgeError | None) -> int:
    """0: every listed update is installed, current, deferred or pinned; 1: some were
    rejected or failed; 2: the cycle itself failed (repository or transport)."""
    if error is not None:
        return EXIT_REPOSITORY
    return EXIT_OK if all(o.action in OK_ACTIONS for o in outcomes) else EXIT_REJECTED


def status_doc(device_id: str, state: AgentState, outcomes: Sequence[Outcome],
               error: SolarEdgeError | None, now: datetime | None = None) -> dict[str, Any]:
    """The report of one cycle (status.json and the report POST carry exactly this)."""
    when = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    return {
        "format": STATUS_FORMAT,
        "device_id": device_id,
        "time": when.isoformat().replace("+00:00", "Z"),
        "installed": {k: v.version for k, v in sorted(state.adapters.items())},
        "active": state.active,
        "pinned": dict(sorted(state.pinned.items())),
        "previous": {k: v.version for k, v in sorted(state.previous.items())},
        "outcomes": [outcome_row(o) for o in outcomes],
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "exit_code": exit_code(outcomes, error),
    }


class Reporter:
    """POSTs status documents to ``url``; at most one in flight, each waited for ``timeout_s``.

    A server that accepts the connection and then trickles its answer cannot hold the agent:
    the agent waits ``timeout_s`` and moves on; while that POST is still pending, later
    reports are skipped (logged) rather than piling up threads."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.sent = 0
        self.failed = 0
        self._pending: threading.Thread | None = None

    def send(self, doc: dict[str, Any]) -> bool:
        if self._pending is not None and self._pending.is_alive():
            log.warning("report to %s skipped: the previous one is still pending", self.url)
            self.failed += 1
            return False
        body = json.dumps(doc, sort_keys=True).encode()
        result: dict[str, str] = {}
        thread = threading.Thread(target=self._post, args=(body, result), daemon=True,
                                  name="solar-edge-report")
        self._pending = thread
        thread.start()
        thread.join(self.timeout_s)
        error = "no answer within the timeout" if thread.is_alive() else result.get("error")
        if error is not None:
            log.warning("report to %s failed (not fatal): %s", self.url, error)
            self.failed += 1
            return False
        self.sent += 1
        return True

    def _post(self, body: bytes, result: dict[str, str]) -> None:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "solar-edge-agent"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                if not 200 <= response.status < 300:
                    result["error"] = f"HTTP {response.status}"
        except Exception as exc:  # noqa: BLE001 - best effort: every failure is only logged
            result["error"] = f"{type(exc).__name__}: {exc}"
