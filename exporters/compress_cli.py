"""``solar-edge compress``: PEFT adapter -> signed packet under a byte budget or an error bound.

The encoder is :mod:`solar_edge.encode.allocate` (rank 0..``--max-rank`` per layer at 2..8 bits,
plain factors or W0-singular-basis coordinates, one global byte allocation). Distortion is
measured on the quantised values the device decodes:

* ``--metric fro`` (default, data-free): ``|dW - dW_hat|_F^2``;
* ``--metric act``: activation-weighted ``tr(E G E^T)`` with ``G`` the base model's
  per-layer input Gram on ``--calib`` texts of the task's training split;
* ``--metric fisher``: ``tr(Gamma E G E^T)`` (K-FAC loss estimate: ``Gamma`` is the
  output-gradient Gram of the adapted model on the labelled calibration texts). The
  measured best predictor of accuracy at small budgets (docs/rate-distortion.md).

``act`` and ``fisher`` need the ``[export]`` extra (torch, transformers).

``--refit STEPS`` (with ``--budget``) then tunes the chosen records' values so the
compressed model's outputs match the uncompressed adapter's on the task's unlabelled
training texts (:mod:`solar_edge.exporters.refit`): same records, same bytes. It is what
makes the smallest packets keep the adapter's accuracy (docs/rate-distortion.md); it needs
the ``[export]`` extra and a task name in task.json, and takes about a minute per
120 steps on two cores.

``--exact`` carries a VeRA, LoRA-XS or TinyLoRA adapter without fitting anything: only its
trained numbers (VeRA scales, ``r x r`` cores), coefficient-only, because the device
regenerates their frozen bases (``--values float16`` halves the size).

``--max-error E`` bisects the budget until the packet's overall relative error
``sqrt(sum_l err_l / sum_l |dW_l|^2)`` in that metric is ``<= E``. The table shows each
layer's bytes and relative error, the packet's bytes (uncompressed bound and the written,
possibly zstd-compressed, size), and the download time on the device profile's link.
"""

from __future__ import annotations

from pathlib import Path

import click

from solar_edge.encode.allocate import Allocation
from solar_edge.errors import CalibrationError
from solar_edge.exporters.compress import CompressOptions, compress_adapter
from solar_edge.format import signing
from solar_edge.format.bundle import load_bundle


def _table(alloc: Allocation, names: dict[int, str]) -> list[str]:
    lines = [f"{'layer':>5}  {'module':<44} {'kind':<7} {'rank':>4} {'bits':>4} "
             f"{'bytes':>7} {'rel.err':>8}"]
    for lid, fit in sorted(alloc.chosen.items()):
        if fit.kind is None:
            kind = "dropped"
        else:
            kind = "basis" if fit.kind.name == "FACTORED_CORE" else "dense"
        lines.append(f"{lid:>5}  {names[lid][:44]:<44} {kind:<7} {fit.rank:>4} "
                     f"{fit.bits or '-':>4} {fit.nbytes:>7} {alloc.layer_error(lid):>8.4f}")
    return lines


@click.command("compress")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Exported bundle the packet is for.")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Largest packet in bytes (uncompressed bound; zstd only shrinks it).")
@click.option("--max-error", type=click.FloatRange(min=0), default=None,
              help="Largest overall relative error in --metric; the budget is bisected.")
@click.option("--metric", type=click.Choice(["fro", "act", "fisher"]), default="fro",
              show_default=True, help="Distortion: Frobenius, activation-weighted, or K-FAC "
                                      "loss estimate on calibration texts.")
@click.option("--calib", type=click.IntRange(min=1), default=64, show_default=True,
              help="Calibration texts for --metric act.")
@click.option("--max-rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--exact", is_flag=True,
              help="Carry a VeRA / LoRA-XS / TinyLoRA adapter exactly (no budget).")
@click.option("--values", "exact_format", type=click.Choice(["float32", "float16"]),
              default="float32", show_default=True, help="Value format with --exact.")
@click.option("--refit", "refit_steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Output-matching refit steps on the task's training texts (0: off; "
                   "120 is a good start). Only with --budget.")
@click.option("--device", "device", default=None,
              help="Device profile for the download-time estimate (default: the bundle's).")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Ed25519 private key (solar-edge keygen); default: a new "
                                 "key whose public half is written to PACKET.pub.")
@click.option("--adapter-id", default=None, help="Packet adapter id (default: directory name).")
@click.option("--version", "adapter_version", type=click.IntRange(min=0), default=1,
              show_default=True, help="Monotonic adapter version.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def compress(adapter_dir: Path, bundle_dir: Path, budget: int | None, max_error: float | None,
             metric: str, calib: int, max_rank: int, exact: bool, exact_format: str,
             refit_steps: int, device: str | None, key_path: Path | None,
             adapter_id: str | None, adapter_version: int, out_path: Path) -> None:
    """Compress ADAPTER_DIR (PEFT LoRA/AdaLoRA/VeRA/TinyLoRA) into a signed packet."""
    if (budget is not None) + (max_error is not None) + exact != 1:
        raise click.UsageError("give exactly one of --budget, --max-error and --exact")
    if exact and (refit_steps or metric != "fro"):
        raise click.UsageError("--exact fits nothing: it takes no --metric or --refit")
    if refit_steps and max_error is not None:
        raise click.UsageError("--refit changes the weight error, so it goes with --budget, "
                               "not --max-error")
    options = CompressOptions(budget=budget, max_error=max_error, metric=metric, calib=calib,
                              max_rank=max_rank, refit_steps=refit_steps, exact=exact,
                              exact_format=exact_format)
    bundle = load_bundle(bundle_dir)
    if key_path is not None:
        key = signing.load_private_key(key_path)
    else:
        key = signing.generate_private_key()
    try:
        result = compress_adapter(adapter_dir, bundle, key, options, adapter_id=adapter_id,
                                  version=adapter_version, on_refit_step=_refit_progress)
    except CalibrationError as exc:  # a missing extra or task name: tell the user plainly
        raise click.ClickException(str(exc)) from exc
    out_path.write_bytes(result.data)
    if key_path is None:
        pub = signing.save_public_key(key, out_path.with_name(out_path.name + ".pub"))
        click.echo(f"signed with a new key; public key: {pub}", err=True)
    alloc, data = result.alloc, result.data
    if alloc is None:
        click.echo(f"carried exactly: {len(result.layer_names)} layers, {exact_format} values, "
                   f"relative error {result.exact_error:.2e}")
        click.echo(f"packet {out_path}: {len(data)} B written")
        _download_times(len(data), device or bundle.profile.get("name"))
        return
    for line in _table(alloc, result.layer_names):
        click.echo(line)
    click.echo(f"metric {metric}: overall relative error {alloc.total_error:.4f}"
               + (f" (bound {max_error:g})" if max_error is not None else "")
               + (" before the refit" if result.refit_loss else ""))
    if result.refit_loss:
        click.echo(f"refit ({refit_steps} steps, {result.refit_texts} texts): output loss "
                   f"{result.refit_loss[0]:.4f} -> {result.refit_loss[1]:.4f}")
    click.echo(f"packet {out_path}: {len(data)} B written ({alloc.total_bytes} B uncompressed "
               f"bound" + (f", budget {budget} B" if budget is not None else "") + ")")
    _download_times(len(data), device or bundle.profile.get("name"))


def _refit_progress(step: int, total: int, loss: float) -> None:
    if step == total or step % 20 == 0:
        click.echo(f"refit step {step}/{total}: loss {loss:.4f}", err=True)


def _download_times(nbytes: int, device: str | None) -> None:
    try:
        from solar_edge.profiles.device import load_profile
        from solar_edge.profiles.links import load_links, transfer_time
    except ImportError:  # pragma: no cover - devices is part of the distribution
        return
    links = load_links()
    own = load_profile(device).link if device else None
    for name, link in links.items():
        mark = "  <- profile " + str(device) if name == own else ""
        click.echo(f"download on {name:<10} {transfer_time(nbytes, link):9.2f} s{mark}")
