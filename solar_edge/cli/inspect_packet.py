"""``solar-edge inspect``: show what a packet holds and where its bytes go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from solar_edge.cli import options
from solar_edge.format import layout, signing
from solar_edge.format.packet import Packet
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import RecordKind

KIND_WIDTH = max(len(kind.name) for kind in RecordKind)  # MAGNITUDE_DELTA: 15


def describe(data: bytes, pkt: Packet) -> dict[str, Any]:
    """A JSON-ready summary: header, codec parameters, layer table, bytes per part."""
    h, c = pkt.header, pkt.codec
    layers, pos_total, val_total = [], 0, 0
    for r in pkt.records:
        pos = layout.positions_nbytes(r.positions)
        val = layout.values_nbytes(r.values.fmt, r.values.count, r.values.group_size)
        pos_total, val_total = pos_total + pos, val_total + val
        layers.append({
            "layer_id": r.layer_id, "kind": r.kind.name, "format": r.values.fmt.name,
            "rows": r.rows, "cols": r.cols, "rank": r.rank, "positions": int(r.positions.size),
            "values": r.values.count, "group_size": r.values.group_size, "variant": r.variant,
            "epsilon": r.epsilon, "positions_bytes": pos, "values_bytes": val,
        })
    header_bytes = layout.header_nbytes(h.adapter_id, h.metadata)
    table_bytes = layout.LAYER_ENTRY_BYTES * len(pkt.records)
    return {
        "format_version": layout.FORMAT_VERSION,
        "fingerprint": h.fingerprint.hex(),
        "adapter_id": h.adapter_id,
        "adapter_version": h.adapter_version,
        "metadata": h.metadata,
        "codec": {"prng": c.prng.name, "perturbation": c.perturbation.name, "seed": c.seed},
        "compressed": pkt.compressed,
        "key_id": pkt.key_id.hex(),
        "layers": layers,
        "bytes": {
            "total": len(data),
            "header": header_bytes,
            "layer_table": table_bytes,
            "positions": pos_total,
            "values": val_total,
            "body_stored": len(data) - header_bytes - layout.TRAILER_BYTES,
            "key_id_and_signature": layout.TRAILER_BYTES,
        },
    }


def _text(info: dict[str, Any], signature: str) -> str:
    b = info["bytes"]
    lines = [
        f"adapter   {info['adapter_id']} v{info['adapter_version']}",
        f"bundle    {info['fingerprint']}",
        f"codec     {info['codec']['prng']} {info['codec']['perturbation']} "
        f"seed={info['codec']['seed']:#x}",
        f"metadata  {json.dumps(info['metadata'], sort_keys=True)}",
        f"signature key {info['key_id']}: {signature}",
        f"bytes     total {b['total']} = header {b['header']} + body {b['body_stored']}"
        f"{' (zstd)' if info['compressed'] else ''} + key id/signature {b['key_id_and_signature']}",
        f"body      layer table {b['layer_table']} + positions {b['positions']} "
        f"+ values {b['values']} (uncompressed)",
        f"{'layer':>5} {'kind':<{KIND_WIDTH}} {'format':<7} {'rows x cols':>11} {'rank':>4} "
        f"{'pos':>6} {'values':>7} {'group':>5} {'var':>3} {'eps':>8} {'bytes':>7}",
    ]
    for lay in info["layers"]:
        shape = f"{lay['rows']}x{lay['cols']}"
        lines.append(
            f"{lay['layer_id']:>5} {lay['kind']:<{KIND_WIDTH}} {lay['format']:<7} {shape:>11} "
            f"{lay['rank']:>4} {lay['positions']:>6} {lay['values']:>7} {lay['group_size']:>5} "
            f"{lay['variant']:>3} {lay['epsilon']:>8.4g} "
            f"{layout.LAYER_ENTRY_BYTES + lay['positions_bytes'] + lay['values_bytes']:>7}"
        )
    return "\n".join(lines)


@click.command("inspect")
@click.argument("packet_path", metavar="PACKET",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options.trusted_keys(help_tail="Given, the signature is verified.")
@options.as_json()
def inspect(packet_path: Path, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Decode PACKET and show its header, codec parameters, layers and bytes per part.

    Without --trusted-key the signature is not checked; with it a bad or untrusted
    signature is an error (exit code 2).
    """
    data = packet_path.read_bytes()
    trusted = [signing.load_public_key(k) for k in trusted_keys] if trusted_keys else None
    pkt = decode_packet(data, trusted_keys=trusted)
    status = "verified" if trusted is not None else "not checked (no --trusted-key)"
    info = describe(data, pkt)
    info["signature"] = status
    if as_json:
        options.emit_json(info)
    else:
        click.echo(_text(info, status))
