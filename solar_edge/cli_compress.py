"""``solar-edge compress``: PEFT adapter -> signed packet under a byte budget or an error bound.

The encoder is :mod:`solar_edge.allocate` (rank 0..``--max-rank`` per layer at 2..8 bits,
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

``--max-error E`` bisects the budget until the packet's overall relative error
``sqrt(sum_l err_l / sum_l |dW_l|^2)`` in that metric is ``<= E``. The table shows each
layer's bytes and relative error, the packet's bytes (uncompressed bound and the written,
possibly zstd-compressed, size), and the download time on the device profile's link.
"""

from __future__ import annotations

from pathlib import Path

import click

from solar_edge import signing
from solar_edge.adapters import match_to_bundle, read_adapter
from solar_edge.allocate import Allocation, AllocConfig, encode_adapter
from solar_edge.bundle import load_bundle
from solar_edge.packet import PacketHeader, encode_packet, fixed_overhead_bytes
from solar_edge.records import CodecHeader


def _metadata(task_meta: dict) -> dict:
    keys = ("task", "labels", "head_seed")
    return {k: task_meta[k] for k in keys if k in task_meta}


def _training_split(task_meta: dict, option: str):
    """The training split of the adapter's task (texts and labels), for calibration."""
    try:
        from solar_edge.exporters.tasks import load_task
    except ImportError as exc:
        raise click.ClickException(f"{option} needs the [export] extra ({exc})") from exc
    name = task_meta.get("task")
    if not name:
        raise click.ClickException(f"{option} needs task.json with a 'task' name")
    return load_task(name).train


def _grams(bundle, task_meta: dict, updates: dict, n_texts: int,
           metric: str) -> tuple[dict, dict | None]:
    """(input Grams, output-gradient Grams or None) for the metric; ({}, None) for fro."""
    if metric == "fro":
        return {}, None
    train = _training_split(task_meta, f"--metric {metric}")
    from solar_edge.exporters.calibration import calibration_fisher, calibration_grams

    step = max(1, len(train) // n_texts)
    texts, labels = train.texts[::step][:n_texts], train.labels[::step][:n_texts]
    if metric == "act":
        return calibration_grams(bundle, texts, sorted(updates)), None
    dense = {lid: u.B @ u.A for lid, u in updates.items()}
    return calibration_fisher(bundle, texts, labels, dense, int(task_meta["head_seed"]),
                              len(task_meta["labels"]))


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
             metric: str, calib: int, max_rank: int, refit_steps: int, device: str | None,
             key_path: Path | None,
             adapter_id: str | None, adapter_version: int, out_path: Path) -> None:
    """Compress ADAPTER_DIR (PEFT LoRA/AdaLoRA/VeRA/TinyLoRA) into a signed packet."""
    if (budget is None) == (max_error is None):
        raise click.UsageError("give exactly one of --budget and --max-error")
    if refit_steps and max_error is not None:
        raise click.UsageError("--refit changes the weight error, so it goes with --budget, "
                               "not --max-error")
    bundle = load_bundle(bundle_dir)
    adapter = read_adapter(adapter_dir)
    updates = match_to_bundle(adapter.updates, bundle.layers)
    bases = {lid: bundle.layer_basis(lid) for lid in updates}
    names = {lid: u.name for lid, u in updates.items()}
    adapter_id = adapter_id or adapter_dir.name
    meta = _metadata(adapter.task_meta)
    overhead = fixed_overhead_bytes(adapter_id, meta)
    grams, out_grams = _grams(bundle, adapter.task_meta, updates, calib, metric)
    alloc = encode_adapter(updates, bases, grams,
                           AllocConfig(max_rank=max_rank, overhead_bytes=overhead),
                           budget_bytes=budget, max_error=max_error, out_grams=out_grams)
    refit_line = _refit(bundle, alloc, updates, bases, adapter.task_meta, refit_steps)
    if key_path is not None:
        key = signing.load_private_key(key_path)
    else:
        key = signing.generate_private_key()
        pub = signing.save_public_key(key, out_path.with_name(out_path.name + ".pub"))
        click.echo(f"signed with a new key; public key: {pub}", err=True)
    header = PacketHeader(bundle.fingerprint, adapter_id, adapter_version, meta)
    data = encode_packet(header, CodecHeader(seed=0), alloc.records, key)
    out_path.write_bytes(data)

    for line in _table(alloc, names):
        click.echo(line)
    click.echo(f"metric {metric}: overall relative error {alloc.total_error:.4f}"
               + (f" (bound {max_error:g})" if max_error is not None else "")
               + (" before the refit" if refit_line else ""))
    if refit_line:
        click.echo(refit_line)
    click.echo(f"packet {out_path}: {len(data)} B written ({alloc.total_bytes} B uncompressed "
               f"bound" + (f", budget {budget} B" if budget is not None else "") + ")")
    _download_times(len(data), device or bundle.profile.get("name"))


def _refit(bundle, alloc: Allocation, updates: dict, bases: dict, task_meta: dict,
           steps: int) -> str:
    """Refit ``alloc.records`` in place (same structure and bytes); the line to print."""
    if not steps:
        return ""
    train = _training_split(task_meta, "--refit")
    if "head_seed" not in task_meta or not task_meta.get("labels"):
        raise click.ClickException("--refit needs task.json with 'head_seed' and 'labels'")
    from solar_edge.exporters.refit import RefitConfig, refit_records

    def progress(step: int, total: int, loss: float) -> None:
        if step == total or step % 20 == 0:
            click.echo(f"refit step {step}/{total}: loss {loss:.4f}", err=True)

    report = refit_records(bundle, alloc.records, updates, bases, list(train.texts),
                           int(task_meta["head_seed"]), len(task_meta["labels"]),
                           RefitConfig(steps=steps), progress=progress)
    alloc.records = report.records
    return (f"refit ({steps} steps, {len(train.texts)} texts): output loss "
            f"{report.loss_before:.4f} -> {report.loss_after:.4f}")


def _download_times(nbytes: int, device: str | None) -> None:
    try:
        from solar_edge.devices.links import load_links, transfer_time
        from solar_edge.devices.profiles import load_profile
    except ImportError:  # pragma: no cover - devices is part of the distribution
        return
    links = load_links()
    own = load_profile(device).link if device else None
    for name, link in links.items():
        mark = "  <- profile " + str(device) if name == own else ""
        click.echo(f"download on {name:<10} {transfer_time(nbytes, link):9.2f} s{mark}")
