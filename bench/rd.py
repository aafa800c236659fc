"""Rate-distortion of real adapters: accuracy and errors versus signed packet bytes, one run.

    python bench/rd.py --bundle artifacts/bundle-x86-64 --adapters artifacts/adapters \
        --out out/rd.json [--max-eval 1000] [--only pydoc-topics/lora-qv-r8 ...]

Standard PEFT classifiers (``adapter_config.json`` with ``"task_type": "SEQ_CLS"``, trained by
``exporters/train_peft.py``, and their ``seqcls-head-only`` references) go to the served path,
``rd_served.py``: every packet applied to the real runtime and scored with the head it
carries, against plain baselines, the data-free and the calibrated ``compress`` pipeline
(``--val``, ``--max-eval``, ``--calib-texts``, ``--max-drop``, ``--curve``; see its docstring):

    nice -n 10 python bench/rd.py --bundle /tmp/rd-bundle --adapters artifacts/seqcls \
        --out out/rd-seqcls.json

When a folder holds both kinds, the served results go to ``<out stem>-served.*``.

For every other adapter directory ``ADAPTERS/<task>/<kind>/`` (trained by
``scripts/train_adapters.py``) and every method below, it builds the real signed packet
(``encode_packet``: header, layer table, positions, values, zstd when smaller, Ed25519
signature), measures ``len(bytes)``, decodes the packet back, and measures on what the
device would reconstruct: held-out accuracy (Wilson 95% CI) of the MiniLM ONNX graph with
``W0 + dW_hat`` patched in, the relative Frobenius error and the activation-weighted error
``sqrt(sum_l tr(E_l G_l E_l^T) / sum_l tr(dW_l G_l dW_l^T))`` (``G_l``: input Gram of layer
``l`` on calibration texts from the training split, base model).

Methods (``family`` in the JSON):

* ``reference``: the uncompressed adapter (fp32 factors; bytes = its safetensors file);
  ``lora-fp16``: its tensors as fp16 safetensors (bytes of that file).
* ``lora-int``: the adapter's own factors as DENSE_FACTORS records, int8 / int4 / int3 with
  group-64 float16 scales (+zstd when smaller).
* ``rank``: rank-k re-truncation of dW (SVD of the factors) with int8 / int4 factors
  (``solar_edge.encode.solar.encode`` with ``dense_factors``, quantisation-aware refit).
* ``random-basis``: NOLA-style sparse coefficients in a seeded random basis (Rademacher
  columns from the project's Philox PRNG), global byte budget.
* ``naive-solar``: sparse coefficients in W0's singular basis (the paper's idea alone).
* ``codec``: ``solar_edge.encode.solar.encode`` (representation ``auto``, int4) at several budgets.
* ``fisher``: the same allocator with the K-FAC distortion ``tr(Gamma E G E^T)``
  (:func:`solar_edge.exporters.calibration.calibration_fisher`, labelled calibration texts);
* ``refit``: the ``fisher`` allocation, then the output-matching refit of its record values
  (:mod:`solar_edge.exporters.refit`: same records and bytes, values tuned so the model's
  outputs match the uncompressed adapter's on the unlabelled training texts);
* ``rank+refit`` (``--ablation``): the rank-1/2 int4 baseline's records put through the
  same refit, to separate what the refit and the allocation each contribute;
* ``actaware``: :mod:`solar_edge.encode.allocate` (activation-aware fits, int2..int8, rank 0..4
  per layer, plain or W0-basis coordinates, global allocation) at several budgets;
  ``frobenius``: the same allocator with ``G = I`` (ablation).
* ``carry``: training-time relatives carried coefficient-only in the bundle basis
  (LoRA-XS cores, TinyLoRA 2x2 cores; float32 and float16 values); VeRA's scaling vectors
  as VERA_SCALES records (the device regenerates its projections). VeRA is also
  compressed like the LoRA kinds: its ``dW`` through every baseline and codec above.

Points are cached in ``<out>.cache.json`` (keyed by adapter file hash, method, held-out size),
so re-runs only evaluate what is new. A PNG (accuracy vs bytes, log x, one panel per
adapter) is written beside the JSON, and a markdown table (``<out>.md``).

This file is the command line, the dispatch and this main loop (one bundle, its base model
opened once in torch, one evaluator and one set of calibration Grams per task); the methods are in
``rd_points.py`` (``rd_packets.py``: packets, baseline records, errors), the evaluator in
``rd_eval.py``, the summary, tables and plot in ``rd_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rd_served  # noqa: E402
from rd_eval import PatchedEvaluator  # noqa: E402
from rd_points import AdapterBench  # noqa: E402
from rd_report import (  # noqa: E402
    TOLERANCE,
    forget_unchecked,
    markdown_table,
    plot,
    print_table,
    summarise,
)

from solar_edge.exporters.calibration import calibration_grams  # noqa: E402
from solar_edge.exporters.families import open_bundle_model  # noqa: E402
from solar_edge.exporters.refit import RefitConfig  # noqa: E402
from solar_edge.format import signing  # noqa: E402
from solar_edge.format.bundle import load_bundle  # noqa: E402

MAIN_KINDS = ("lora-qv-r8", "lora-all-r16", "adalora", "vera")


def subset(n_total: int, n: int | None) -> np.ndarray:
    """Evenly spaced indices (the splits are sorted by text, so a prefix would be biased)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n).round().astype(int)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="artifacts/bundle-x86-64")
    ap.add_argument("--adapters", default="artifacts/adapters")
    ap.add_argument("--out", default="out/rd.json")
    ap.add_argument("--max-eval", type=int, default=1000,
                    help="held-out examples per task (evenly spaced; all when fewer); "
                         "SEQ_CLS: report texts after the validation ones")
    ap.add_argument("--calib", type=int, default=128, help="calibration texts (training split)")
    ap.add_argument("--only", nargs="*", default=None, help="task/kind names to run")
    ap.add_argument("--fracs", default="0.3,0.5,1.0",
                    help="allocator budgets as fractions of the best baseline's bytes")
    ap.add_argument("--refit-fracs", default="0.1,0.2,0.3,0.5",
                    help="refit budgets (fractions of the best baseline), smallest first")
    ap.add_argument("--refit-steps", type=int, default=RefitConfig().steps,
                    help="optimiser steps of the output-matching refit (SEQ_CLS: of the "
                         "calibrated codec; the default is compress's)")
    ap.add_argument("--ablation", action="store_true",
                    help="also run the activation-only and Frobenius allocators, and more "
                         "sparse-basis budgets")
    ap.add_argument("--recheck", action="store_true",
                    help="rebuild and re-evaluate each adapter's smallest codec and baseline "
                         "packets within the tolerance when they lack prediction agreement")
    served = ap.add_argument_group("standard PEFT classifiers (SEQ_CLS, rd_served.py)")
    served.add_argument("--val", type=int, default=200,
                        help="validation texts (choices are made on these)")
    served.add_argument("--calib-texts", type=int, default=256,
                        help="unlabelled training texts written as calibration data")
    served.add_argument("--max-drop", type=float, default=0.5,
                        help="accuracy drop target in points (compress --max-drop, and the "
                             "tolerance of the best baseline on validation)")
    rd_served.add_quant_weights_option(served)
    served.add_argument("--curve", action="store_true",
                        help="also the calibrated codec at fixed budgets (a refit each)")
    served.add_argument("--packets", default=None,
                        help="write every packet built to this folder (ADAPTER/FAMILY.SETTING.slr)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    names_of = lambda ds: [f"{d.parent.name}/{d.name}" for d in ds]  # noqa: E731
    seqcls = rd_served.seqcls_dirs(Path(args.adapters))
    if args.only:
        seqcls = [d for d, n in zip(seqcls, names_of(seqcls), strict=True) if n in args.only]
    dirs = sorted(p.parent for p in Path(args.adapters).glob("*/*/task.json")
                  if p.parent not in seqcls)
    if args.only:
        dirs = [d for d, n in zip(dirs, names_of(dirs), strict=True) if n in args.only]
    if seqcls:
        rd_served.run(args, seqcls, out.with_name(out.stem + "-served.json") if dirs else out)
    if dirs or not seqcls:
        legacy(args, dirs, out)
    return 0


def legacy(args: argparse.Namespace, dirs: list[Path], out: Path) -> None:
    """The weight-space benchmark of the project's own adapters (seeded heads)."""
    from solar_edge.exporters.tasks import load_task

    bundle = load_bundle(args.bundle)
    model = open_bundle_model(bundle, purpose="the rate-distortion benchmark")  # once per run
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_suffix(".cache.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    key = signing.generate_private_key()
    fracs = tuple(float(f) for f in args.fracs.split(","))
    refit_fracs = tuple(float(f) for f in args.refit_fracs.split(","))
    previous = json.loads(out.read_text()) if out.is_file() else {}
    results: dict = previous.get("adapters", {})
    by_task: dict[str, list[Path]] = {}
    for d in dirs:
        by_task.setdefault(d.parent.name, []).append(d)
    for task_name, adirs in by_task.items():
        task = load_task(task_name)
        idx = subset(len(task.test), args.max_eval)
        cal = subset(len(task.train), args.calib)
        meta0 = json.loads((adirs[0] / "task.json").read_text())
        evaluator = PatchedEvaluator(bundle, [task.test.texts[i] for i in idx],
                                     [task.test.labels[i] for i in idx],
                                     int(meta0["head_seed"]), task.num_labels)
        grams = calibration_grams(model, bundle, [task.train.texts[i] for i in cal],
                                  [layer.id for layer in bundle.layers])
        for adir in adirs:
            name = f"{task_name}/{adir.name}"
            meta = json.loads((adir / "task.json").read_text())
            print(f"{name}: held-out n={len(idx)}, calibration {len(cal)} texts", flush=True)
            b = AdapterBench(name, adir, bundle, model, evaluator, grams, cache, key, len(idx))
            if args.recheck and name in results:
                forget_unchecked(cache, b.tag, results[name]["summary"])
            b.save = lambda: cache_path.write_text(json.dumps(cache, indent=1))
            b.ablation = args.ablation
            b.sparse_fracs = (0.25, 0.5) if args.ablation else (0.5,)
            b.calib_texts = [task.train.texts[i] for i in cal]
            b.calib_labels = [task.train.labels[i] for i in cal]
            b.refit_texts = list(task.train.texts)
            b.reference()
            kind = meta.get("adapter_kind", adir.name)
            if kind in ("lora-xs", "tinylora"):
                r = int(b.adapter.config.get("r", 2))
                b.carry(r)
            if kind == "vera":
                b.carry_vera()
            if kind in MAIN_KINDS:
                b.baselines()
                b.codecs(fracs)
                b.refits(refit_fracs, RefitConfig(steps=args.refit_steps))
            cache_path.write_text(json.dumps(cache, indent=1))
            results[name] = {"points": b.points, "summary": summarise(name, b.points, meta),
                             "held_out": len(idx), "calibration_texts": len(cal)}
            report = {"bundle": str(args.bundle), "tolerance": TOLERANCE, "adapters": results}
            out.write_text(json.dumps(report, indent=1, default=float))
    plot(results, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown_table(results))
    print_table(results)


if __name__ == "__main__":
    sys.exit(main())
