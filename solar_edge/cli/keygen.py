"""``solar-edge keygen``: create an Ed25519 signing key pair for packets."""

from __future__ import annotations

import re
from pathlib import Path

import click

from solar_edge.format import signing

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


@click.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for NAME.key (private, mode 0600) and NAME.pub (hex).")
@click.option("--name", default="signing", show_default=True, help="Base name of the key files.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair of that name.")
def keygen(out_dir: Path, name: str, force: bool) -> None:
    """Generate an Ed25519 key pair; print its key id (as written in packets)."""
    if not _NAME.fullmatch(name):
        raise click.BadParameter("use letters, digits, '.', '_' or '-'", param_hint="--name")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = signing.generate_private_key()
    private = signing.save_private_key(key, out_dir / f"{name}.key", overwrite=force)
    public = signing.save_public_key(key, out_dir / f"{name}.pub")
    click.echo(f"private key: {private} (keep secret)")
    click.echo(f"public key:  {public}")
    click.echo(f"key id:      {signing.key_id(key).hex()}")
