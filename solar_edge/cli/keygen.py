"""``solar-edge keygen``: create an Ed25519 signing key pair for packets."""

from __future__ import annotations

from pathlib import Path

import click

from solar_edge.cli import options
from solar_edge.format import signing
from solar_edge.format.ids import ID_RULE, is_valid_id


@click.command("keygen")
@options.out_dir("NAME.key (private, mode 0600) and NAME.pub (hex).")
@click.option("--name", default="signing", show_default=True, help="Base name of the key files.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair of that name.")
@options.as_json()
def keygen(out: Path, name: str, force: bool, as_json: bool) -> None:
    """Generate an Ed25519 key pair; print its key id (as written in packets)."""
    if not is_valid_id(name):
        raise click.BadParameter(ID_RULE, param_hint="--name")
    out.mkdir(parents=True, exist_ok=True)
    key = signing.generate_private_key()
    private = signing.save_private_key(key, out / f"{name}.key", overwrite=force)
    public = signing.save_public_key(key, out / f"{name}.pub")
    kid = signing.key_id(key).hex()
    if as_json:
        options.emit_json({"private_key": str(private), "public_key": str(public),
                           "key_id": kid})
        return
    click.echo(f"private key: {private} (keep secret)")
    click.echo(f"public key:  {public}")
    click.echo(f"key id:      {kid}")
