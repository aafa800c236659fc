"""Options every command spells the same way, defined once.

* ``--signing-key FILE``: an Ed25519 *private* key (``solar-edge keygen``), for commands that
  sign (``compress``, ``publish``);
* ``--trusted-key FILE`` (repeatable): a *public* key whose signatures are accepted, for
  commands that verify (``inspect``, ``run``, ``agent``);
* packets are positional arguments; ``--out`` says in its help whether it is a file or a
  folder; ``--json`` prints one JSON object instead of text; ``--quiet`` drops progress.

Spellings of an earlier release are accepted but hidden from ``--help``
(:class:`AliasedOption`), e.g. ``--key`` for either key option.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class AliasedOption(click.Option):
    """An option whose second and later spellings work but are not shown in ``--help``."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def _file(exists: bool = True) -> click.Path:
    return click.Path(exists=exists, dir_okay=False, path_type=Path)


def signing_key(required: bool = True, help_tail: str = "") -> Decorator:
    return click.option("--signing-key", "--key", "signing_key", cls=AliasedOption,
                        required=required, type=_file(),
                        help="Ed25519 private key file that signs (solar-edge keygen)."
                             + (f" {help_tail}" if help_tail else ""))


def trusted_keys(required: bool = False, help_tail: str = "") -> Decorator:
    return click.option("--trusted-key", "--key", "trusted_keys", cls=AliasedOption,
                        multiple=True, required=required, type=_file(),
                        help="Ed25519 public key file whose signatures are trusted "
                             "(hex or PEM; repeatable)." + (f" {help_tail}" if help_tail else ""))


def packets(required: bool = True) -> Decorator:
    return click.argument("packets", metavar="PACKET..." if required else "[PACKET]...",
                          nargs=-1, required=required, type=_file())


def _existing_folder(ctx: click.Context, param: click.Parameter, value: Path | None
                     ) -> Path | None:
    """A file to write must go into a folder that exists: said before any work is done,
    not as a traceback after it."""
    if value is not None and not value.parent.is_dir():
        raise click.BadParameter(f"folder {str(value.parent)!r} does not exist", ctx, param)
    return value


def out_file(help_text: str, required: bool = True) -> Decorator:
    return click.option("--out", "out", required=required,
                        type=click.Path(dir_okay=False, path_type=Path),
                        callback=_existing_folder, help=f"File to write: {help_text}")


def out_dir(help_text: str, required: bool = True, default: str | None = None) -> Decorator:
    return click.option("--out", "out", required=required and default is None, default=default,
                        show_default=default is not None,
                        type=click.Path(file_okay=False, path_type=Path),
                        help=f"Folder to write: {help_text}")


def as_json() -> Decorator:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object instead of text.")


def quiet() -> Decorator:
    return click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, sort_keys=True, default=str))


def progress_echo(quiet_flag: bool) -> Callable[[str], None]:
    """A stderr line writer that ``--quiet`` silences."""
    def echo(text: str) -> None:
        if not quiet_flag:
            click.echo(text, err=True)
    return echo
