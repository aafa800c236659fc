"""``solar-edge run``: apply packets to a bundle's model and answer texts (board side)."""

from __future__ import annotations

import json
import time

import click
import numpy as np

from solar_edge.format import signing
from solar_edge.runtime.backends_ort import MECHANISMS


@click.command("run")
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False), help="Exported bundle directory.")
@click.option("--packet", "packets", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Signed adapter packet to apply (repeatable; the last one serves).")
@click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Trusted Ed25519 public key file (repeatable).")
@click.option("--text", "texts", multiple=True, required=True, help="Input text (repeatable).")
@click.option("--switch", "switch_to", default=None, help="Adapter id to serve after applying.")
@click.option("--mechanism", type=click.Choice([*MECHANISMS, "tflite"]), default=None,
              help="Patching mechanism (default: the bundle profile's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def run(bundle_dir: str, packets: tuple[str, ...], keys: tuple[str, ...], texts: tuple[str, ...],
        switch_to: str | None, mechanism: str | None, as_json: bool) -> None:
    """Answer TEXTs with the bundle's model, patched by the given packets."""
    from solar_edge.runtime.engine import EdgeRuntime

    if packets and not keys:
        raise click.UsageError("--packet needs at least one trusted --key")
    trusted = [signing.load_public_key(k) for k in keys]
    rt = EdgeRuntime(bundle_dir, trusted or _no_keys(), mechanism=mechanism)
    applied = []
    for path in packets:
        with open(path, "rb") as f:
            data = f.read()
        t = time.perf_counter()
        info = rt.apply(data)
        applied.append({"packet": path, "adapter_id": info.adapter_id, "version": info.version,
                        "apply_ms": round((time.perf_counter() - t) * 1e3, 2),
                        "cache_bytes": info.cache_bytes})
    if switch_to:
        rt.switch(switch_to)
    active = rt.active
    out = rt.infer(list(texts))
    result: dict = {"mechanism": rt.mechanism, "applied": applied,
                    "active": None if active is None else active.adapter_id, "answers": []}
    for text, row in zip(texts, out, strict=True):
        if active is not None and active.labels:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            best = int(row.argmax())
            result["answers"].append({"text": text, "label": active.labels[best],
                                      "p": round(float(probs[best]), 4)})
        else:
            result["answers"].append({"text": text, "dim": int(row.size),
                                      "norm": round(float(np.linalg.norm(row)), 4),
                                      "head": [round(float(v), 4) for v in row[:6]]})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"mechanism: {rt.mechanism}")
    for a in applied:
        click.echo(f"applied {a['adapter_id']} v{a['version']} in {a['apply_ms']:.1f} ms "
                   f"(cache {a['cache_bytes']} B)")
    click.echo(f"serving: {result['active'] or 'base model'}")
    for ans in result["answers"]:
        if "label" in ans:
            click.echo(f"{ans['label']}\t(p={ans['p']:.3f})\t{ans['text']}")
        else:
            head = " ".join(f"{v:+.4f}" for v in ans["head"])
            click.echo(f"embedding[{ans['dim']}] norm={ans['norm']:.4f} [{head} ...]\t"
                       f"{ans['text']}")


def _no_keys() -> list:
    """Without packets no key is needed: a throwaway key that no packet can match."""
    return [signing.generate_private_key().public_key()]
