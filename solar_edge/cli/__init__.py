"""The ``solar-edge`` command: a click group whose subcommands live beside the code they drive.

Subcommands are imported lazily so that ``solar-edge run`` on a board never imports the
export stage (torch) and a missing optional extra only disables its own commands.
"""

from __future__ import annotations

import importlib
import json
import sys

import click

from solar_edge.errors import SolarEdgeError

# name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "keygen": "solar_edge.cli.keygen:keygen",
    "inspect": "solar_edge.cli.inspect_packet:inspect",
    "compress": "solar_edge.exporters.compress_cli:compress",
    "export": "solar_edge.exporters.cli:export",
    "unpack": "solar_edge.exporters.unpack:unpack",
    "eval": "solar_edge.exporters.eval_cmd:eval_packet",
    "run": "solar_edge.runtime.cli:run",
    "generate": "solar_edge.runtime.generate_cli:generate",
    "publish": "solar_edge.devices.cli:publish",
    "rotate-key": "solar_edge.devices.cli:rotate_key",
    "serve": "solar_edge.devices.cli:serve",
    "agent": "solar_edge.devices.cli:agent",
    "device": "solar_edge.devices.device_cli:device",
    "linkbench": "solar_edge.devices.cli:linkbench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = exc.name or module_name
            reason = str(exc)

            @click.command(cmd_name, help=f"(unavailable: cannot import {missing})")
            def unavailable() -> None:
                raise click.ClickException(
                    f"'{cmd_name}' needs {missing}, which is not installed here "
                    f"({reason}). Install its extra, e.g. pip install 'solar-edge[export]'."
                )

            return unavailable
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup)
@click.version_option(package_name="solar-edge")
def cli() -> None:
    """Ship fine-tuned adapters to edge boards as signed coefficient-only packets."""


def _fail(message: str, kind: str, code: int) -> None:
    """One line on stderr; with ``--json`` also one JSON object on stdout. Exits ``code``."""
    click.echo(f"error: {message}", err=True)
    if "--json" in sys.argv[2:]:
        click.echo(json.dumps({"error": message, "error_type": kind, "exit_code": code}))
    sys.exit(code)


def main() -> None:
    """Console entry point: typed solar-edge errors become one clear line and exit code 2
    (and, with ``--json``, one JSON object ``{"error", "error_type", "exit_code"}``)."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "solar-edge"
        _fail(f"{exc.format_message()} (see '{where} --help')", "UsageError", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), type(exc).__name__, exc.exit_code)
    except SolarEdgeError as exc:
        _fail(f"{type(exc).__name__}: {exc}", type(exc).__name__, 2)


