"""``solar-edge run``: apply packets to a bundle's model and answer texts or images (board
side; images: :mod:`solar_edge.runtime.images`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from solar_edge.cli import options
from solar_edge.format import signing
from solar_edge.runtime.backends import mechanisms

PREVIEW = 6  # embedding values shown per text in the text output (--json has them all)


def _read_texts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{path}: cannot read as UTF-8 text ({exc})",
                                 param_hint="--texts") from exc
    return [line.strip() for line in lines if line.strip()]


def _answers(texts: list[str], out: np.ndarray, labels: list[str] | None,
             key: str = "text") -> list[dict[str, Any]]:
    rows = []
    for text, row in zip(texts, out, strict=True):
        if labels:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            best = int(row.argmax())
            rows.append({key: text, "label": labels[best], "p": round(float(probs[best]), 4),
                         "logits": [round(float(v), 5) for v in row]})
        else:
            rows.append({key: text, "dim": int(row.size),
                         "embedding": [float(v) for v in row]})
    return rows


@click.command("run")
@options.packets(required=False)
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False), help="Exported bundle directory.")
@click.option("--packet", "legacy_packets", multiple=True, hidden=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options.trusted_keys()
@click.option("--text", "texts", multiple=True, help="Input text (repeatable).")
@click.option("--texts", "texts_file", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path),
              default=None, help="File of input texts, one per line.")
@click.option("--image", "image_paths", multiple=True, type=click.Path(exists=True,
              path_type=Path), help="Input image (PNG, JPEG, .npy) or a folder of them "
                                    "(repeatable; image bundles).")
@click.option("--switch", "switch_to", default=None,
              help="Adapter id to serve after applying (default: the last packet's).")
@click.option("--mechanism", type=click.Choice(mechanisms()), default=None,
              help="Patching mechanism (default: the bundle profile's).")
@options.as_json()
def run(packets: tuple[Path, ...], bundle_dir: str, legacy_packets: tuple[Path, ...],
        trusted_keys: tuple[Path, ...], texts: tuple[str, ...], texts_file: Path | None,
        image_paths: tuple[Path, ...], switch_to: str | None, mechanism: str | None,
        as_json: bool) -> None:
    """Answer texts (or images) with the bundle's model, patched by the signed PACKETs (the
    last serves)."""
    from solar_edge.runtime.engine import EdgeRuntime
    from solar_edge.runtime.families import causal_lm, vit
    from solar_edge.runtime.images import read_images

    packets = packets + legacy_packets
    inputs: list[Any] = list(texts) + (_read_texts(texts_file) if texts_file else [])
    if inputs and image_paths:
        raise click.UsageError("give texts or images, not both")
    names, images = read_images(image_paths) if image_paths else ([], [])
    if not inputs and not images:
        if texts_file:
            raise click.UsageError(f"--texts {texts_file}: no texts in it (one per line)")
        raise click.UsageError("give --text TEXT, --texts FILE or --image FILE/FOLDER")
    if packets and not trusted_keys:
        raise click.UsageError("packets need at least one --trusted-key")
    trusted = [signing.load_public_key(k) for k in trusted_keys]
    rt = EdgeRuntime(bundle_dir, trusted or _no_keys(), mechanism=mechanism)
    if rt.family.name == causal_lm.NAME:
        raise click.UsageError("this bundle's model is a decoder LM: continue prompts with "
                               "solar-edge generate --bundle B --prompt TEXT")
    takes_images = rt.family.name == vit.NAME
    if takes_images and inputs:
        raise click.UsageError("this bundle's model takes images: give --image FILE/FOLDER")
    if images and not takes_images:
        raise click.UsageError(f"this bundle's model ({rt.family.name}) takes texts, not "
                               "images: give --text TEXT or --texts FILE")
    applied = []
    for path in packets:
        t = time.perf_counter()
        info = rt.apply(path.read_bytes())
        applied.append({"packet": str(path), "adapter_id": info.adapter_id,
                        "version": info.version,
                        "apply_ms": round((time.perf_counter() - t) * 1e3, 2),
                        "cache_bytes": info.cache_bytes})
    if switch_to:
        rt.switch(switch_to)
    active = rt.active
    out = rt.infer(images or inputs)
    key = "image" if images else "text"
    result = {"mechanism": rt.mechanism, "applied": applied,
              "active": None if active is None else active.adapter_id,
              "answers": _answers(names or inputs, out, active.labels if active else None,
                                  key)}
    if as_json:
        options.emit_json(result)
        return
    click.echo(f"mechanism: {rt.mechanism}")
    for a in applied:
        click.echo(f"applied {a['adapter_id']} v{a['version']} in {a['apply_ms']:.1f} ms "
                   f"(cache {a['cache_bytes']} B)")
    click.echo(f"serving: {result['active'] or 'base model'}")
    for ans in result["answers"]:
        if "label" in ans:
            click.echo(f"{ans['label']}\t(p={ans['p']:.3f})\t{ans[key]}")
        else:
            head = " ".join(f"{v:+.4f}" for v in ans["embedding"][:PREVIEW])
            norm = float(np.linalg.norm(ans["embedding"]))
            click.echo(f"embedding[{ans['dim']}] norm={norm:.4f} [{head} ...]\t{ans[key]}")


def _no_keys() -> list:
    """Without packets no key is needed: a throwaway key that no packet can match."""
    return [signing.generate_private_key().public_key()]
