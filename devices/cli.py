"""``solar-edge publish | serve | agent | linkbench``: thin click shells over devices/*.

Each command's work lives in a function that Python callers (``make demo``) can use
directly: :func:`~solar_edge.devices.repo.publish`, :class:`RepoServer`,
:func:`build_runtime_agent`, :func:`~solar_edge.devices.linkbench.run_linkbench`.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from solar_edge.cli import options
from solar_edge.devices.agent import Agent, AgentConfig, RetryPolicy
from solar_edge.devices.repo import Expiry, Repository, root_path, signer_from_key
from solar_edge.devices.repo import publish as publish_packets
from solar_edge.devices.report import outcome_row
from solar_edge.devices.server import RepoServer
from solar_edge.errors import SolarEdgeError
from solar_edge.format import signing
from solar_edge.profiles.links import get_link, load_links

MAX_EXPIRES_DAYS = 3650.0      # targets lifetime; root lives 12x this
MAX_TIMESTAMP_HOURS = 24 * 3650.0
MAX_INTERVAL_S = 7 * 86400.0
SERVED = ("metadata", "targets")


def _bounded(most: float, unit: str, zero_ok: bool = False) -> Any:
    """A click callback: a finite number in (0, most] ([0, most] with ``zero_ok``), or None."""
    def check(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
        if value is None:
            return None
        low_ok = value >= 0 if zero_ok else value > 0
        if not math.isfinite(value) or not low_ok or value > most:
            floor = "0 <=" if zero_ok else "0 <"
            raise click.BadParameter(f"must be a finite number of {unit} with {floor} x <= "
                                     f"{most:g}, got {value!r}")
        return value
    return check


def _refuse_key_folder(folder: Path, what: str) -> None:
    """A repository folder is meant to be served: it must hold no private key."""
    keys = sorted(p.name for p in folder.glob("*.key")) if folder.is_dir() else []
    if keys:
        raise click.UsageError(f"{folder} holds a private key ({', '.join(keys)}): keep keys "
                               f"out of the {what} folder")


@click.command("publish")
@options.packets()
@options.signing_key(help_tail="It signs all four TUF roles (one key: demo setups).")
@options.out_dir("the TUF repository (created if missing).")
@click.option("--expires-days", default=30.0, show_default=True, type=float,
              callback=_bounded(MAX_EXPIRES_DAYS, "days"),
              help="Lifetime of targets metadata (root: 12x, snapshot: 1/4, timestamp: 1/30).")
@click.option("--timestamp-hours", type=float, default=None,
              callback=_bounded(MAX_TIMESTAMP_HOURS, "hours"),
              help="Lifetime of timestamp metadata (overrides the default 1/30 of targets).")
@click.option("--replace", is_flag=True, help="List only these packets (drop earlier targets).")
@click.option("--rollout", default=1.0, show_default=True, type=float,
              help="Fraction (0 < f <= 1) of devices that may install these packets now; "
                   "publish the same packets again with a larger one to widen the rollout.")
@options.as_json()
def publish(packets: tuple[Path, ...], signing_key: Path, out: Path, expires_days: float,
            timestamp_hours: float | None, replace: bool, rollout: float, as_json: bool) -> None:
    """Publish signed PACKETs as content-addressed targets of a TUF repository.

    Refuses (exit 2) to publish other bytes under a published id+version, or into a
    repository whose root does not trust the signing key."""
    _refuse_key_folder(Path(out), "published")
    expiry = Expiry.from_targets_days(expires_days, timestamp_hours)
    names = publish_packets(list(packets), signing.load_private_key(signing_key), out, expiry,
                            replace, rollout=rollout)
    if as_json:
        options.emit_json({"targets": names, "root": str(root_path(out)), "rollout": rollout})
        return
    for name in names:
        click.echo(name)
    click.echo(f"trusted root for devices: {root_path(out)}")


@click.command("rotate-key")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@options.signing_key(help_tail="The repository's current root key.")
@click.option("--new-key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Ed25519 private key file that signs every TUF role from now on.")
@click.option("--expires-days", default=30.0, show_default=True, type=float,
              callback=_bounded(MAX_EXPIRES_DAYS, "days"),
              help="Lifetime of targets metadata (root: 12x, snapshot: 1/4, timestamp: 1/30).")
@options.as_json()
def rotate_key(repo: str, signing_key: Path, new_key: Path, expires_days: float,
               as_json: bool) -> None:
    """Replace the key of every TUF role of REPO with --new-key (a lost or retiring key).

    The new root is signed by both keys, so devices provisioned with any earlier root follow
    it; later publishes need --signing-key NEW. Packets keep their own signatures: packets
    signed with a new key need that key among the devices' --trusted-key."""
    expiry = Expiry.from_targets_days(expires_days)
    repository = Repository(repo, signer_from_key(signing.load_private_key(signing_key)))
    version = repository.rotate_key(signer_from_key(signing.load_private_key(new_key)), expiry)
    if as_json:
        options.emit_json({"root_version": version, "root": f"{version}.root.json"})
    else:
        click.echo(f"root v{version} trusts the new key for every role; devices follow it on "
                   "their next check")


@click.command("serve")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--link", default=None, help="Throttle each connection like this link profile.")
@click.option("--links-file", type=click.Path(exists=True, dir_okay=False), default=None)
@options.quiet()
def serve(repo: str, host: str, port: int, link: str | None, links_file: str | None,
          quiet: bool) -> None:
    """Serve a repository folder over HTTP (Range requests; optional link throttle).

    Prints the URL on stdout once listening."""
    profile = get_link(link, links_file) if link else None
    _refuse_key_folder(Path(repo), "served")
    try:
        server = RepoServer(repo, host, port, link=profile, only=SERVED)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: "
                                   f"{exc.strerror or exc}") from exc
    options.progress_echo(quiet)(f"serving {repo} at {server.url}"
                                 + (f" as {link}" if link else ""))
    click.echo(server.url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def build_runtime_agent(server_url: str, bundle_dir: str | Path, device: str | None,
                        state_dir: str | Path, trusted_keys: list[Any],
                        root: bytes | None = None, retry: RetryPolicy | None = None,
                        device_id: str | None = None, report_url: str | None = None) -> Agent:
    """An :class:`Agent` driving a real ``EdgeRuntime`` on ``bundle_dir`` (not yet started)."""
    from solar_edge.devices.applier import RuntimeApplier
    from solar_edge.runtime.engine import EdgeRuntime

    applier = RuntimeApplier(lambda: EdgeRuntime(str(bundle_dir), trusted_keys, device))
    config = AgentConfig(server_url, Path(state_dir), trusted_root=root,
                         retry=retry or RetryPolicy(), device_id=device_id,
                         report_url=report_url)
    return Agent(config, applier)


def _report_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise click.BadParameter("must be an http:// or https:// URL")
    return value


@click.command("agent")
@click.option("--server", "server_url", required=True, help="Repository base URL.")
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--device", default=None, help="Device profile name (default: the bundle's).")
@options.trusted_keys(required=True, help_tail="Packets must be signed by one of them.")
@click.option("--root", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Provisioned TUF root.json (needed on first run).")
@click.option("--state", "state_dir", type=click.Path(file_okay=False), default=None,
              help="Agent state folder [default: BUNDLE.agent].")
@click.option("--once", is_flag=True, help="One update cycle, then exit.")
@click.option("--cycles", default=1440, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--interval", default=60.0, show_default=True, type=float,
              callback=_bounded(MAX_INTERVAL_S, "seconds", zero_ok=True),
              help="Seconds between cycles.")
@click.option("--attempts", default=6, show_default=True, type=click.IntRange(1, 100),
              help="Tries per cycle while the server is unreachable (exponential backoff).")
@click.option("--device-id", default=None,
              help="This device's id for staged rollouts and reports [default: a random id "
                   "generated once and kept in the state folder].")
@click.option("--report-url", default=None, callback=_report_url,
              help="POST each cycle's status.json here (best effort, 5 s timeout).")
@options.as_json()
def agent(server_url: str, bundle: str, device: str | None, trusted_keys: tuple[Path, ...],
          root: str | None, state_dir: str | None, once: bool, cycles: int, interval: float,
          attempts: int, device_id: str | None, report_url: str | None, as_json: bool) -> None:
    """Fetch, verify and apply adapter updates; roll back on failure; state is crash-safe.

    Exit code of the last cycle: 0 every listed update installed, current, deferred by its
    rollout or held by a pin; 1 some were rejected or failed; 2 the cycle failed
    (repository or transport) or the command could not start."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    keys = [signing.load_public_key(p) for p in trusted_keys]
    runner = build_runtime_agent(server_url, bundle, device,
                                 state_dir or f"{bundle.rstrip('/')}.agent", keys,
                                 Path(root).read_bytes() if root else None,
                                 RetryPolicy(attempts=attempts), device_id, report_url)
    try:
        state = runner.start()
        installed = {k: v.version for k, v in state.adapters.items()}
        outcomes = runner.run(cycles=1 if once else cycles, interval_s=interval,
                              keep_going=not once)
    except SolarEdgeError as exc:
        if not as_json:
            raise
        options.emit_json({"device_id": runner.device_id, "exit_code": 2, "outcomes": [],
                           "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(2)
    if as_json:
        options.emit_json({"restored": {"active": state.active, "installed": installed},
                           "device_id": runner.device_id, "exit_code": runner.exit_code,
                           "outcomes": [outcome_row(o) for o in outcomes],
                           "error": None if runner.last_error is None
                           else f"{type(runner.last_error).__name__}: {runner.last_error}"})
    else:
        click.echo(f"restored: active={state.active} installed={installed}")
        for outcome in outcomes:
            click.echo(str(outcome))
    sys.exit(runner.exit_code)


@click.command("linkbench")
@options.packets(required=False)
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="Exported bundle: the full model is its ONNX graph with every external "
                   "data file the graph names.")
@click.option("--full-model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A model file instead of --bundle (an .onnx brings its external data).")
@click.option("--lora", required=True, type=click.Path(exists=True, dir_okay=False),
              help="adapter_model.safetensors (its dtype is read from the header); its zstd "
                   "form is computed here.")
@click.option("--packet", "legacy_packets", multiple=True, hidden=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--links", "link_names", default=None,
              help="Comma-separated link names [default: all in links.toml].")
@click.option("--links-file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--budget-s", default=3.0, show_default=True,
              help="Longest real download per cell; beyond it a prefix is measured.")
@options.out_dir("the table (JSON, Markdown) and chart (PNG).", default="linkbench-out")
@options.as_json()
def linkbench(packets: tuple[Path, ...], bundle: str | None, full_model: str | None, lora: str,
              legacy_packets: tuple[Path, ...], link_names: str | None, links_file: str | None,
              budget_s: float, out: Path, as_json: bool) -> None:
    """Bytes and download time per link for the full model, LoRA, LoRA+zstd and the PACKET."""
    from solar_edge.devices import artifact_info as info
    from solar_edge.devices.linkbench import (
        parts_table,
        run_linkbench,
        table,
        tar_parts,
        write_outputs,
        zstd_file,
    )

    if len(packets + legacy_packets) != 1:
        raise click.UsageError("give exactly one PACKET")
    if (bundle is None) == (full_model is None):
        raise click.UsageError("give the full model as --bundle DIR (or --full-model FILE)")
    packet = (packets + legacy_packets)[0]
    links = load_links(links_file)
    chosen = ([get_link(n.strip(), links_file) for n in link_names.split(",")] if link_names
              else list(links.values()))
    if bundle is not None:
        folder, parts = Path(bundle), info.bundle_model_parts(Path(bundle))
    elif full_model is not None and full_model.endswith(".onnx"):
        folder, parts = Path(full_model).parent, info.model_parts(Path(full_model))
    else:
        model = Path(str(full_model))
        folder, parts = model.parent, [info.FilePart(model.name, model.stat().st_size,
                                                     "unknown (not an ONNX graph)")]
    lora_dtype = info.dtype_summary(info.safetensors_dtypes(Path(lora)))
    dtypes = {"full model": info.parts_dtype(parts) if len(parts) > 1 else parts[0].dtype,
              "LoRA": lora_dtype, "LoRA zstd": f"{lora_dtype} (zstd)",
              "SOLAR packet": info.dtype_summary(info.packet_dtypes(Path(packet)))}
    with tempfile.TemporaryDirectory(prefix="linkbench-") as tmp:
        files = {"full model": folder / parts[0].rel if len(parts) == 1
                 else tar_parts(folder, parts, Path(tmp) / "model.tar"),
                 "LoRA": Path(lora),
                 "LoRA zstd": zstd_file(Path(lora), Path(tmp) / "lora.safetensors.zst"),
                 "SOLAR packet": Path(packet)}
        rows = run_linkbench(files, chosen, budget_s, dtypes)
    paths = write_outputs(rows, Path(out), parts)
    if as_json:
        options.emit_json({"rows": [r.__dict__ for r in rows],
                           "full_model_files": [p.__dict__ for p in parts],
                           "files": {k: str(v) for k, v in paths.items()}})
        return
    click.echo(table(rows))
    click.echo(parts_table(parts))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
