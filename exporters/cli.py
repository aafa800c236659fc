"""``solar-edge export``: write a bundle (graph, bases, manifest) for one device profile."""

from __future__ import annotations

import re
from pathlib import Path

import click

from solar_edge.cli import options
from solar_edge.profiles.device import known_profiles, load_profile

from .backend_choice import CHOICES, resolve_backend
from .progress import Progress

# Same as onnx_export.EXPORTERS; repeated so that `--help` and a bad --device answer
# without importing torch.
EXPORTERS = ("torchscript", "dynamo")


def _targets(value: str | None) -> str | list[str] | None:
    """``query,value`` -> names (suffix-matched); ``re:<pattern>`` -> a regex (full match)."""
    if value is None:
        return None
    if value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as exc:
            raise click.BadParameter(f"not a regular expression ({exc})",
                                     param_hint="--target-modules") from exc
        return value[3:]
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise click.BadParameter("empty list", param_hint="--target-modules")
    return names


@click.command("export")
@click.argument("model", required=False)
@click.option("--device", "device", required=True,
              help=f"Device profile name (shipped: {', '.join(known_profiles())}).")
@options.out_dir("the bundle (created; --force replaces a non-empty one).")
@click.option("--target-modules", default=None,
              help="Comma-separated module names matched as dotted suffixes (PEFT style), "
                   "or 're:<regex>' matched against full names. Default: every Linear "
                   "layer outside heads (pooler, lm_head, classifier, score).")
@click.option("--exporter", type=click.Choice(EXPORTERS), default="torchscript",
              show_default=True, help="torch ONNX exporter.")
@click.option("--graph-variants", default=None,
              help="Comma-separated extra ONNX graphs for runtime patching mechanisms "
                   "(inputs, lora). Default: the profile's graph_variants.")
@click.option("--backend", type=click.Choice(sorted(CHOICES)), default=None,
              help="Graph backend, overriding the profile's: onnx (ONNX Runtime only) or "
                   "tflite (needs the convert extra). Default: the profile's backend.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@options.quiet()
@options.as_json()
def export(model: str | None, device: str, out: Path, target_modules: str | None,
           exporter: str, graph_variants: str | None, backend: str | None, force: bool,
           quiet: bool, as_json: bool) -> None:
    """Export MODEL for a device: ONNX (and TFLite) graph, SVD bases, manifest.

    MODEL is a Hugging Face transformers directory or 'module:function' returning
    (nn.Module, dict of example inputs); omitted, the embedded all-MiniLM-L6-v2.
    """
    # fail fast, before torch is imported: unknown profile, missing TFLite converter
    profile = resolve_backend(load_profile(device), backend)
    from .pipeline import export_bundle

    result = export_bundle(model, profile, out, target_modules=_targets(target_modules),
                           exporter=exporter, overwrite=force,
                           graph_variants=None if graph_variants is None
                           else [v.strip() for v in graph_variants.split(",") if v.strip()],
                           progress=Progress(enabled=not quiet))
    bundle = result.bundle
    ranks = sorted({layer.rank for layer in bundle.layers})
    if as_json:
        options.emit_json({"bundle": str(out), "layers": len(bundle.layers), "ranks": ranks,
                           "fingerprint": bundle.fingerprint.hex(),
                           "family": bundle.manifest["model"].get("family"),
                           "seconds": result.seconds,
                           "max_abs_diff_onnx": result.max_abs_diff_onnx})
        return
    click.echo(f"bundle {out}: {len(bundle.layers)} layers, ranks {ranks}, "
               f"fingerprint {bundle.fingerprint.hex()}")
