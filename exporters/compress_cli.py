"""``solar-edge compress``: PEFT adapter -> signed packet under a byte budget or an error bound.

The encoder is :mod:`solar_edge.encode.allocate` (rank 0..``--max-rank`` per layer at 2..8
bits, plain factors or W0-singular-basis coordinates, one global byte allocation), run by the
compress pipeline (:mod:`solar_edge.exporters.compress`). Distortion is measured on the
quantised values the device decodes:

* ``--metric fro`` (data-free): ``|dW - dW_hat|_F^2``, each layer's divided by its own
  (what leaving the layer out costs) so that every layer counts alike, no layer with an
  update left out where every layer's cheapest record fits, what quantisation adds beyond
  rank truncation weighed at one half (``DATA_FREE_QUANT_WEIGHT``: more rank at fewer bits),
  and never worse than the best uniform baseline's predicted error
  (:func:`solar_edge.encode.allocate.balanced`, ``allocate(cover=True)``);
* ``--metric act``: activation-weighted ``tr(E G E^T)`` with ``G`` the base model's
  per-layer input Gram on ``--calib`` calibration texts;
* ``--metric fisher``: ``tr(Gamma E G E^T)`` (K-FAC loss estimate at the adapted model;
  labels from the calibration file, else the adapter's own predictions).

``--refit STEPS`` (with ``--budget`` or ``--max-drop``) then tunes the chosen records' values so the
compressed model's outputs match the uncompressed adapter's on the calibration texts
(:mod:`solar_edge.exporters.refit`): same records, same bytes.

Defaults: with ``--calib-data``, ``--metric fisher``, and ``--refit 120`` with ``--budget``
(no refit with ``--max-drop``, where it measured larger packets, or ``--max-error``); for an
adapter without a task head (no class outputs to match), ``--metric act`` and no refit.
Without it, ``--metric fro`` and no refit.

Calibration texts: ``--calib-data FILE`` (``.txt``, one per line, or ``.jsonl`` with
``"text"`` and optional ``"label"``); without it ``--metric act/fisher`` and ``--refit``
take the built-in task named by the adapter's ``task.json`` (the project's own adapters).
The steps that run the model need the ``[export]`` extra and the bundle's base model
(``--model DIR``; default: the embedded MiniLM when the bundle was exported from it).

``--exact`` carries the adapter without fitting anything: a VeRA, LoRA-XS or TinyLoRA by
its trained numbers alone, coefficient-only; any other (LoRA, DoRA, AdaLoRA) as its own
factors (``--values float16`` halves the size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from solar_edge.cli import options
from solar_edge.encode.allocate import Allocation
from solar_edge.errors import CalibrationError
from solar_edge.format import signing
from solar_edge.format.bundle import load_bundle
from solar_edge.format.records import RecordKind
from solar_edge.methods.peft_files import read_adapter
from solar_edge.profiles.device import load_profile
from solar_edge.profiles.links import load_links, transfer_time

from .adapter_checks import has_task_head
from .compress import Compressed, CompressOptions, compress_adapter


def _layers(alloc: Allocation, names: dict[int, str]) -> list[dict[str, Any]]:
    rows = []
    for lid, fit in sorted(alloc.chosen.items()):
        kind = ("dropped" if fit.kind is None else
                "basis" if fit.kind == RecordKind.FACTORED_CORE else "dense")
        rows.append({"layer_id": lid, "module": names[lid], "kind": kind, "rank": fit.rank,
                     "bits": fit.bits, "bytes": fit.nbytes,
                     "rel_error": round(alloc.layer_error(lid), 6)})
    return rows


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'layer':>5}  {'module':<44} {'kind':<7} {'rank':>4} {'bits':>4} "
             f"{'bytes':>7} {'rel.err':>8}"]
    for r in rows:
        lines.append(f"{r['layer_id']:>5}  {r['module'][:44]:<44} {r['kind']:<7} {r['rank']:>4} "
                     f"{r['bits'] or '-':>4} {r['bytes']:>7} {r['rel_error']:>8.4f}")
    return lines


def _download_times(nbytes: int, device: str | None) -> dict[str, dict[str, Any]]:
    own = load_profile(device).link if device else None
    return {name: {"seconds": round(transfer_time(nbytes, link), 3), "profile": name == own}
            for name, link in load_links().items()}


def _summary(result: Compressed, out: Path, budget: int | None, max_error: float | None,
             device: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"packet": str(out), "bytes": len(result.data),
                            "layers": len(result.layer_names), "metadata": result.metadata,
                            "calibration": result.calibration,
                            "extras_bytes": result.extras_bytes, "notes": result.notes}
    if result.alloc is None:
        info["exact_error"] = result.exact_error
    else:
        info.update(uncompressed_bytes=result.alloc.total_bytes, budget=budget,
                    max_error=max_error, total_rel_error=round(result.alloc.total_error, 6),
                    layer_table=_layers(result.alloc, result.layer_names))
        if result.refit_loss:
            info["refit"] = {"texts": result.refit_texts, "loss_before": result.refit_loss[0],
                             "loss_after": result.refit_loss[1]}
    if result.curve is not None:
        info["search"] = {**result.curve, "measured_on": result.eval_source}
    info["download_s"] = _download_times(len(result.data), device)
    return info


def _print(info: dict[str, Any], metric: str, refit_steps: int, device: str | None) -> None:
    if "layer_table" not in info:
        click.echo(f"carried exactly: {info['layers']} layers, relative error "
                   f"{info['exact_error']:.2e}")
    else:
        for line in _table(info["layer_table"]):
            click.echo(line)
        bound = f" (bound {info['max_error']:g})" if info["max_error"] is not None else ""
        click.echo(f"metric {metric}: overall relative error {info['total_rel_error']:.4f}"
                   + bound + (" before the refit" if "refit" in info else ""))
        if "refit" in info:
            r = info["refit"]
            click.echo(f"refit ({refit_steps} steps, {r['texts']} texts): output loss "
                       f"{r['loss_before']:.4f} -> {r['loss_after']:.4f}")
    if info["extras_bytes"]:
        head = info["metadata"].get("head")
        what = "head, biases and magnitudes" if head else "biases and magnitudes"
        click.echo(f"{what}: {info['extras_bytes']} B of the packet")
    if info["calibration"]:
        click.echo(f"calibration texts: {info['calibration']}")
    if "search" in info:
        sr = info["search"]
        click.echo(f"--max-drop {sr['max_drop']:g}: measured on {sr['measured_on']}"
                   + (f" (uncompressed adapter {sr['reference_accuracy']:.1f}%)"
                      if sr["reference_accuracy"] is not None else ""))
        click.echo(f"{'budget or candidate':>24} {'bytes':>8} {'agree %':>8} {'cosine':>8} "
                   f"{'acc %':>7} {'drop':>6}")
        from .target_search import chosen_row

        chosen = chosen_row(sr)
        for p in sr["points"]:
            acc = "-" if p["accuracy"] is None else f"{p['accuracy']:.1f}"
            agree = "-" if p["agreement"] is None else f"{p['agreement']:.1f}"
            cosine = "-" if p["cosine"] is None else f"{p['cosine']:.4f}"
            mark = "  <- chosen" if p is chosen else ""
            budget = p["budget"] if p["method"] == "codec" else p["method"]
            click.echo(f"{budget:>24} {p['bytes']:>8} {agree:>8} {cosine:>8} {acc:>7} "
                       f"{p['drop']:>6.2f}{mark}")
    extra = ""
    if "uncompressed_bytes" in info:
        extra = f" ({info['uncompressed_bytes']} B before zstd" + (
            f", budget {info['budget']} B" if info["budget"] is not None else "") + ")"
    click.echo(f"packet {info['packet']}: {info['bytes']} B written{extra}")
    for name, t in info["download_s"].items():
        mark = f"  <- profile {device}" if t["profile"] else ""
        click.echo(f"download on {name:<10} {t['seconds']:9.2f} s{mark}")


DEFAULT_REFIT = 120
WITHOUT_DATA = ("no calibration data: data-free allocation (each layer's weight error "
                "relative to its own, so every layer counts alike). With "
                "--calib-data (a few hundred of your task's texts, unlabelled is fine) compress "
                "weighs errors by what the model sees and refits the packet to the adapter's "
                "outputs: on a standard PEFT LoRA classifier at 7.5 KB, 81.5% agreement with "
                "the adapter against 63% data-free (docs/rate-distortion.md).")


WITHOUT_HEAD = "the adapter has no classifier head (an embedding or decoder adapter): "
WITHOUT_HEAD_METRIC = "--metric defaults to act (fisher weighs class outputs)"
WITHOUT_HEAD_REFIT = "--refit defaults to 0"


def _defaults(metric: str | None, refit: int | None, calib_data: Path | None, exact: bool,
              max_error: float | None, has_head: bool = True,
              max_drop: float | None = None) -> tuple[str, int, list[str]]:
    """With calibration data the measured-best pipeline (fisher, plus the refit for a
    ``--budget``; for an adapter without a head, act and no refit), else data-free (and a
    note of what data would buy). ``--max-drop`` gets no refit: on the served benchmark of
    standard PEFT classifiers the refit made its packets larger (docs/rate-distortion.md)."""
    if exact:
        return "fro", 0, []
    if calib_data is None:
        return metric or "fro", refit or 0, [] if metric else [WITHOUT_DATA]
    if not has_head:
        defaulted = [text for given, text in ((metric, WITHOUT_HEAD_METRIC),
                                              (refit, WITHOUT_HEAD_REFIT)) if given is None]
        advice = [WITHOUT_HEAD + ", ".join(defaulted)] if defaulted else []
        return metric or "act", refit or 0, advice
    if refit is None:
        refit = 0 if max_error is not None or max_drop is not None else DEFAULT_REFIT
    return metric or "fisher", refit, []


@click.command("compress")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Exported bundle the packet is for.")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Largest signed packet in bytes, everything counted (filled after zstd).")
@click.option("--max-error", type=click.FloatRange(min=0), default=None,
              help="Largest overall relative error in --metric; the budget is bisected.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None,
              help="Largest accuracy drop in points against the uncompressed adapter, "
                   "measured as the board serves the packet: the share of texts the adapter "
                   "gets right and the packet wrong (unlabelled: that disagree); the "
                   "smallest such packet wins.")
@click.option("--eval-data", type=click.Path(exists=True, path_type=Path),
              default=None, help="What the --max-drop is measured on: texts (.txt, or .jsonl "
                                 "with labels), or images (a folder; labelled: one folder per "
                                 "label) (default: a quarter of --calib-data held back).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="With --max-drop: write the bytes-against-drop curve (PNG).")
@click.option("--metric", type=click.Choice(["fro", "act", "fisher"]), default=None,
              help="Distortion: Frobenius (data-free), activation-weighted, or K-FAC loss "
                   "estimate on calibration texts. Default: fisher with --calib-data (act for an "
                   "adapter without a task head), else fro.")
@click.option("--calib-data", type=click.Path(exists=True, path_type=Path),
              default=None, help="Calibration texts: .txt (one per line) or .jsonl "
                                 "(\"text\", optional \"label\"), or a folder of images "
                                 "for an image model. Without it compress runs "
                                 "data-free; --metric act/fisher or --refit without it use "
                                 "the built-in task named in the adapter's task.json.")
@click.option("--calib", type=click.IntRange(min=1), default=64, show_default=True,
              help="Calibration texts used for --metric act/fisher.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path), default=None,
              help="The bundle's base model (transformers directory) for the steps that run "
                   "it; default: the embedded MiniLM when the bundle is its export.")
@click.option("--max-rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--exact", is_flag=True,
              help="Carry the adapter exactly, no budget: VeRA / LoRA-XS / TinyLoRA by "
                   "their coefficients, any other as its own factors at --values.")
@click.option("--values", "exact_format", type=click.Choice(["float32", "float16"]),
              default="float32", show_default=True, help="Value format with --exact.")
@click.option("--refit", "refit_steps", type=click.IntRange(min=0), default=None,
              help="Output-matching refit steps on the calibration texts (0: off). Default: "
                   f"{DEFAULT_REFIT} with --calib-data and --budget (0 for an adapter without a "
                   "task head), else 0.")
@click.option("--device", "device", default=None,
              help="Device profile for the download-time estimate (default: the bundle's).")
@click.option("--canary", "canary", type=click.Choice(["update", "outputs", "none"]),
              default="update", show_default=True,
              help="What the packet vouches for, signed, for the board to check before it "
                   "serves: its decoded update (checked without a forward pass), its outputs "
                   "on the bundle's canary inputs (one forward pass per apply), or nothing "
                   "(the board runs one forward pass and checks outputs are finite).")
@click.option("--no-canary", "no_canary", is_flag=True, help="Same as --canary none.")
@options.signing_key(required=False, help_tail="Default: a new key whose public half is "
                                               "written beside the packet as PACKET.pub.")
@click.option("--adapter-id", default=None, help="Packet adapter id (default: directory name).")
@click.option("--adapter-version", "--version", "adapter_version", cls=options.AliasedOption,
              type=click.IntRange(min=1), default=1, show_default=True,
              help="Monotonic adapter version (devices only install newer ones).")
@options.out_file("the signed packet (.slr).")
@options.as_json()
@options.quiet()
def compress(adapter_dir: Path, bundle_dir: Path, budget: int | None, max_error: float | None,
             max_drop: float | None, eval_data: Path | None, plot_path: Path | None,
             metric: str | None, calib_data: Path | None, calib: int, model_dir: Path | None,
             max_rank: int, exact: bool, exact_format: str, refit_steps: int | None,
             canary: str, no_canary: bool,
             device: str | None, signing_key: Path | None, adapter_id: str | None,
             adapter_version: int, out: Path, as_json: bool, quiet: bool) -> None:
    """Compress ADAPTER_DIR (a PEFT adapter saved by save_pretrained) into a signed packet."""
    if (budget is not None) + (max_error is not None) + exact + (max_drop is not None) != 1:
        raise click.UsageError("give exactly one of --budget, --max-error, --max-drop and "
                               "--exact")
    if plot_path is not None and max_drop is None:
        raise click.UsageError("--plot draws the --max-drop search")
    if exact and (refit_steps or metric not in (None, "fro")):
        raise click.UsageError("--exact fits nothing: it takes no --metric or --refit")
    if refit_steps and max_error is not None:
        raise click.UsageError("--refit changes the weight error, so it goes with --budget, "
                               "not --max-error")
    note = options.progress_echo(quiet)
    has_head = True
    if calib_data is not None and not exact and (metric is None or refit_steps is None):
        has_head = has_task_head(read_adapter(adapter_dir))
    metric, refit_steps, advice = _defaults(metric, refit_steps, calib_data, exact, max_error,
                                            has_head, max_drop)
    opts = CompressOptions(budget=budget, max_error=max_error, metric=metric, calib=calib,
                           max_rank=max_rank, refit_steps=refit_steps, exact=exact,
                           exact_format=exact_format, calib_data=calib_data,
                           model_dir=model_dir, max_drop=max_drop, eval_data=eval_data,
                           canary="none" if no_canary else canary)
    bundle = load_bundle(bundle_dir)
    key = (signing.load_private_key(signing_key) if signing_key is not None
           else signing.generate_private_key())

    def on_refit_step(step: int, total: int, loss: float) -> None:
        if step == total or step % 20 == 0:
            note(f"refit step {step}/{total}: loss {loss:.4f}")

    def on_point(p: Any) -> None:
        accuracy = "" if p.accuracy is None else f", accuracy {p.accuracy:.1f}%"
        what = f"budget {p.budget} B" if p.method == "codec" else p.method
        agreement = (f"cosine {p.cosine:.4f}" if p.agreement is None
                     else f"agreement {p.agreement:.1f}%")
        note(f"{what}: packet {p.nbytes} B, {agreement}{accuracy}, drop {p.drop:.2f} pt")

    try:
        result = compress_adapter(adapter_dir, bundle, key, opts, adapter_id=adapter_id,
                                  version=adapter_version, on_refit_step=on_refit_step,
                                  on_point=on_point)
    except CalibrationError as exc:  # a missing extra, data or model: tell the user plainly
        raise click.ClickException(str(exc)) from exc
    if plot_path is not None and result.curve is not None:
        from .target_search import CurvePoint, chosen_row, plot

        def point(row: dict) -> CurvePoint:
            return CurvePoint(**{("nbytes" if k == "bytes" else k): v for k, v in row.items()})

        plot([point(p) for p in result.curve["points"]], max_drop or 0.0,
             point(chosen_row(result.curve)), str(plot_path))
    out.write_bytes(result.data)
    if signing_key is None:
        pub = signing.save_public_key(key, out.with_name(out.name + ".pub"))
        note(f"signed with a new key; public key: {pub}")
    device = device or bundle.profile.get("name")
    for line in result.notes + advice:
        note(f"note: {line}")
    info = _summary(result, out, budget, max_error, device)
    if as_json:
        options.emit_json(info)
    else:
        _print(info, metric, refit_steps, device)
