"""Rate-distortion of the ViT digits adapters as a board serves them: ``bench/rd_served.py``'s
method on images.

    nice -n 5 python bench/vit_rd.py [--vit artifacts/vit] [--out out/vit-rd/rd.json] \
        [--calib-images 256] [--max-drop 0.5] [--variants refit,no-refit,rmax2]

For each task of ``scripts/pretrain_vit.py`` (its PEFT LoRA adapter with a trained head), every
packet is signed as ``solar-edge compress`` signs it (metadata, head records, canary digest),
applied to one real :class:`~solar_edge.runtime.engine.EdgeRuntime` on the ViT bundle and
scored with the head it carries; bytes are ``len`` of the signed packet:

* ``reference``: the lossless packet (float32 factors and head); ``torch``: PEFT
  ``merge_and_unload`` on the same images;
* plain baselines (``rd_served.ServedBench.baselines``): the adapter's own factors at
  int8 / int4 / int3, rank-k re-truncation (k = 1, 2, 4, 8) at int4 / int8, each with the
  same head;
* ``data-free``: ``compress_adapter(budget=B)`` at every baseline's bytes, on a doubling
  ladder and at :data:`FRACS` of the best baseline's bytes, and the ``--max-drop`` search;
* ``calibrated`` (calibration: a folder of ``--calib-images`` unlabelled training images as
  PNG, ``--model`` the base ViT): the ``--max-drop`` search with and without the refit, and
  at :data:`FRACS` of the best baseline's bytes per variant: ``refit`` (fisher + refit,
  compress's default for a budget), ``no-refit`` (fisher alone), ``rmaxK`` (fisher + refit,
  ``max_rank=K``; also a data-free ladder at that rank), ``refitN`` (N refit steps),
  ``fisherN`` (N calibration images for the fisher statistics instead of compress's 64).

Images: the task's held-out split in a fixed seeded order, the first ``--val-share`` of it
validation (choices are made there), the rest the test split, never used to choose. The
``--max-drop`` searches measure on the validation images as a labelled folder (one folder
per label name), so compress counts, as this script does, the images the lossless packet
gets right and the packet wrong. The best plain baseline and
the codec packet reported against it are both the smallest of their kind that loses at most
``--max-drop`` points of validation images the lossless packet gets right (``val_lost``);
``lost`` is the same count on the test split.

Writes ``<out>.json``, ``<out>.md`` (tables), ``<out>.png`` (test accuracy against bytes) and
``<out>.cache.json`` (points keyed by adapter file hash, bundle, split sizes and method).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rd_served  # noqa: E402
import rd_served_report as report  # noqa: E402
from rd_served import ServedBench, ServedMeter, Splits  # noqa: E402

from solar_edge.exporters.compress import CompressOptions  # noqa: E402
from solar_edge.exporters.compress_cli import DEFAULT_REFIT  # noqa: E402
from solar_edge.format.bundle import Bundle, load_bundle  # noqa: E402
from solar_edge.methods.peft_files import read_adapter  # noqa: E402
from solar_edge.runtime.images import ImageSpec  # noqa: E402

FRACS = (0.15, 0.2, 0.25, 0.3, 1 / 3, 0.36, 0.4, 0.5, 0.65, 0.8, 1.0)
CODECS = ("data-free", "calibrated")
BUDGET = re.compile(r"^budget \d+")


def _write_pngs(folder: Path, images: np.ndarray, labels: list[str] | None = None) -> Path:
    """``images`` as PNG under ``folder``; with ``labels``, one subfolder per label name."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.png"), *folder.glob("*/*.png")]:  # this script's own files
        old.unlink()
    for sub in folder.iterdir():  # label folders it emptied
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    for i, im in enumerate(images):
        where = folder if labels is None else folder / labels[i]
        where.mkdir(exist_ok=True)
        Image.fromarray(im).save(where / f"{i:04d}.png")
    return folder


def image_splits(data: Any, folder: Path, n_calib: int, val_share: float) -> Splits:
    """Validation / test images of ``data`` (an ``ImageTask``), calibration and validation
    folders written under ``folder`` (``<task>/calib``: evenly spaced training images;
    ``<task>/val/<label name>/``: the validation images), PNG."""
    test, train = data.test, data.train
    order = np.random.default_rng(rd_served.SPLIT_SEED).permutation(len(test.labels))
    n_val = int(round(val_share * len(order)))
    val, rep = order[:n_val], order[n_val:]
    cal = np.unique(np.linspace(0, len(train.labels) - 1,
                                min(n_calib, len(train.labels))).round().astype(int))
    calib = _write_pngs(folder / data.name / "calib", train.images[cal])
    val_dir = _write_pngs(folder / data.name / "val", test.images[val],
                          [data.labels[y] for y in test.labels[val]])
    return Splits(list(test.images[val]), test.labels[val], list(test.images[rep]),
                  test.labels[rep], calib, val_dir)


def torch_predictions(base: Path, adapter: Path, spec: ImageSpec, images: list) -> np.ndarray:
    """The adapter in torch: PEFT on ``ViTForImageClassification``, merged."""
    from vit import torch_merged

    return torch_merged(base, adapter, spec, np.stack(images)).argmax(1)


class ImageBench(ServedBench):
    """:class:`rd_served.ServedBench` on images: compress gets the base ViT (``model_dir``),
    torch predictions come from PEFT's ViT, and calibrated packets have budget ladders."""

    model_dir: Path = Path()
    spec: ImageSpec | None = None

    def compress(self, family: str, setting: str, options: CompressOptions) -> dict:
        return super().compress(family, setting,
                                dataclasses.replace(options, model_dir=self.model_dir))

    def torch(self) -> dict:
        key = f"{self.tag}|torch"
        if key not in self.cache:
            assert self.spec is not None
            preds = torch_predictions(self.model_dir, self.adir, self.spec, self.splits.texts)
            self.cache[key] = {**rd_served.scores("", preds, self.splits.labels),
                               "predictions": preds.tolist()}
            self.save()
        return self.cache[key]

    def ladder_budgets(self) -> list[int]:
        best = report.best_baseline(self.rows, self.args.max_drop)
        top = best["bytes"] if best else max(
            r["bytes"] for r in self.rows if r["family"] in report.BASELINES and "bytes" in r)
        return sorted({int(f * top) for f in FRACS})

    def ladders(self, variants: list[str]) -> None:
        """Data-free (also at each ``rmaxK``) and every calibrated variant at :data:`FRACS`
        of the best baseline's bytes."""
        calib = {"calib_data": self.splits.calib, "metric": "fisher"}
        ranks = [int(v[4:]) for v in variants if v.startswith("rmax")]
        for budget in self.ladder_budgets():
            self.compress("data-free", f"budget {budget}", CompressOptions(budget=budget))
            for k in ranks:
                self.compress("data-free", f"budget {budget} rmax{k}",
                              CompressOptions(budget=budget, max_rank=k))
            for v in variants:
                suffix = {"refit": "", "no-refit": f" {rd_served.NO_REFIT}"}.get(v, f" {v}")
                self.compress("calibrated", f"budget {budget}{suffix}", CompressOptions(
                    budget=budget, **variant_settings(v, self.args.refit_steps), **calib))


VARIANT = re.compile(r"refit|no-refit|rmax[1-9]\d*|refit[1-9]\d*|fisher[1-9]\d*")


def variant_settings(v: str, refit_steps: int) -> dict[str, int]:
    """CompressOptions of a calibrated variant: ``refit`` (compress's default for a budget),
    ``no-refit``, ``rmaxK`` (max rank K), ``refitN`` (N refit steps), ``fisherN`` (N
    calibration images for the fisher statistics); all but ``no-refit`` refit."""
    if v == "no-refit":
        return {"refit_steps": 0}
    if v.startswith("rmax"):
        return {"refit_steps": refit_steps, "max_rank": int(v[4:])}
    if v.startswith("fisher"):
        return {"refit_steps": refit_steps, "calib": int(v[6:])}
    return {"refit_steps": int(v[5:] or refit_steps)}


def add_test_lost(rows: list[dict], labels: np.ndarray) -> None:
    """``lost``: points of test images the reference (``rows[0]``) gets right and a row wrong."""
    ref_right = np.asarray(rows[0]["predictions"]) == labels
    for r in rows:
        if "predictions" in r:
            r["lost"] = float(100 * np.mean(ref_right & (np.asarray(r["predictions"]) != labels)))


def variant(p: dict) -> str:
    """A codec point's method without its budget: ``calibrated rmax2``, ``data-free``, ..."""
    rest = BUDGET.sub("", p["setting"]).strip()
    return f"{p['family']} {rest}".strip()


def chosen(points: list[dict], max_drop: float) -> dict[str, Any]:
    """Chosen on validation (``val_lost <= max_drop``), reported on test: the best plain
    baseline, the smallest codec packet (any family / variant) and per variant its smallest."""
    ref = points[0]
    best = report.best_baseline(points, max_drop)
    ok = [p for p in points if p["family"] in CODECS and "bytes" in p
          and p.get("val_lost") is not None and p["val_lost"] <= max_drop + 1e-9]
    by: dict[str, dict] = {}
    for p in sorted(ok, key=lambda p: p["bytes"]):
        by.setdefault(variant(p), p)

    def cell(p: dict | None) -> dict | None:
        if p is None:
            return None
        return {"family": p["family"], "setting": p["setting"], "bytes": p["bytes"],
                "val_lost": p["val_lost"], "accuracy": p["accuracy"], "ci95": p["ci95"],
                "lost": p.get("lost"), "drop": 100 * (ref["accuracy"] - p["accuracy"]),
                "ratio": p["bytes"] / best["bytes"] if best else None}

    codec = min(ok, key=lambda p: p["bytes"]) if ok else None
    out = cell(codec)
    return {"reference_accuracy": ref["accuracy"], "best_baseline": cell(best),
            "codec": out, "goal_met": None if not out or out["ratio"] is None else (
                out["ratio"] <= report.GOAL and out["drop"] <= max_drop + 1e-9),
            "by_variant": {k: cell(p) for k, p in sorted(by.items())}}


def _acc(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{100 * p['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def chosen_markdown(results: dict, max_drop: float) -> str:
    d = f"{max_drop:g}"
    lines = [f"Chosen on validation (loses at most {d} pt of validation images the lossless "
             "packet gets right), reported on test:", "",
             "| task | lossless packet, test acc | best plain baseline | smallest codec packet "
             "| its test drop / lost (pt) | codec / baseline (goal <= 1/3) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(results.items()):
        c, ref = r["chosen"], r["points"][0]
        b, k = c["best_baseline"], c["codec"]
        base = f"{b['bytes']} B ({b['setting']}, {_acc(b)})" if b else "none"
        codec = f"{k['bytes']} B ({k['family']} {k['setting']}, {_acc(k)})" if k else "none"
        drop = f"{k['drop']:+.1f} / {k['lost']:.1f}" if k else "-"
        ratio = "-" if not k or k["ratio"] is None else (
            f"{k['ratio']:.2f} ({'met' if c['goal_met'] else 'missed'})")
        lines.append(f"| {name} | {ref['bytes']} B, {_acc(ref)} | {base} | {codec} | {drop} "
                     f"| {ratio} |")
    lines += ["", "Smallest packet of each codec variant within the validation bar:", "",
              "| task | variant | bytes | val lost (pt) | test acc | test drop / lost (pt) "
              "| / baseline |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(results.items()):
        for v, k in r["chosen"]["by_variant"].items():
            ratio = "-" if k["ratio"] is None else f"{k['ratio']:.2f}"
            lines.append(f"| {name} | {v} | {k['bytes']} | {k['val_lost']:.1f} | {_acc(k)} "
                         f"| {k['drop']:+.1f} / {k['lost']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Test accuracy against bytes, one line per family / variant, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rd_report import save_panels, style_panel

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.4), squeeze=False)
    for ax, (name, r) in zip(axes.flat, sorted(results.items()), strict=False):
        pts = [p for p in r["points"] if "bytes" in p and not p["setting"].startswith("max")]
        ax.axhline(100 * r["points"][0]["accuracy"], color="k", lw=0.8, label="lossless")
        groups: dict[str, list[dict]] = {}
        for p in (p for p in pts if p["family"] != "reference"):
            key = variant(p) if p["family"] in CODECS else p["family"]
            groups.setdefault(key, []).append(p)
        for i, (key, g) in enumerate(sorted(groups.items())):
            g.sort(key=lambda p: p["bytes"])
            plain = key in report.BASELINES  # points, not a curve
            ax.plot([p["bytes"] for p in g], [100 * p["accuracy"] for p in g],
                    marker={"lora-int": "x", "rank": "+"}.get(key, "o"), ms=7 if plain else 3,
                    lw=1, ls="" if plain else "-", label=key,
                    color="k" if plain else plt.cm.tab20(i % 20))
        style_panel(ax, name, "test accuracy %")
    save_panels(fig, axes, len(results), path)
    plt.close(fig)


def run(args: Any, tasks: list[tuple[str, Path, Any]], base: Path, bundle: Bundle,
        out: Path) -> dict:
    """Every packet of each ``(name, adapter dir, ImageTask)``; writes the report files."""
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_suffix(".cache.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    spec = ImageSpec.from_manifest(bundle.manifest["model"])
    results: dict[str, dict] = {}
    for name, adir, data in tasks:
        splits = image_splits(data, out.parent / "images", args.calib_images, args.val_share)
        meter = ServedMeter(str(bundle.root), splits)
        adapter = read_adapter(adir)
        print(f"{name}: validation {len(splits.val_labels)}, test {len(splits.labels)}, "
              f"calibration {args.calib_images} images", flush=True)
        b = ImageBench(name, adir, adapter, adir / "adapter_model.safetensors", bundle, meter,
                       splits, cache, args)
        b.model_dir, b.spec = base, spec
        b.save = lambda: cache_path.write_text(json.dumps(cache))
        b.reference()
        torch_row = b.torch()
        b.baselines()
        b.datafree()
        b.calibrated(args.curve)
        b.ladders(args.variants)
        add_test_lost(b.rows, splits.labels)
        results[name] = report.adapter_result(b.rows, torch_row, False, args.max_drop,
                                              [int(y) for y in splits.labels])
        results[name]["chosen"] = chosen(results[name]["points"], args.max_drop)
        results[name]["split"] = {"val": len(splits.val_labels), "test": len(splits.labels),
                                  "calib_images": args.calib_images}
    meta = {"bundle": str(bundle.root), "fingerprint": bundle.fingerprint.hex(),
            "split": "held-out images in a fixed seeded order: validation = the first "
                     f"{args.val_share:g}, test = the rest; calibration = evenly spaced "
                     "training images, unlabelled PNG",
            "max_drop": args.max_drop, "refit_steps": args.refit_steps,
            "variants": args.variants, "wall_s": round(time.perf_counter() - started, 1)}
    out.write_text(json.dumps({**meta, "adapters": results}, indent=1, default=float))
    md = chosen_markdown(results, args.max_drop) + "\n" + report.markdown(results, args.max_drop)
    out.with_suffix(".md").write_text(md)
    plot(results, out.with_suffix(".png"))
    print(md)
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vit", type=Path, default=Path("artifacts/vit"))
    ap.add_argument("--out", type=Path, default=Path("out/vit-rd/rd.json"))
    ap.add_argument("--only", nargs="*", default=None, help="task names to run")
    ap.add_argument("--val-share", type=float, default=0.5,
                    help="share of the held-out images used for validation")
    ap.add_argument("--calib-images", type=int, default=256,
                    help="unlabelled training images written as the calibration folder")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--refit-steps", type=int, default=DEFAULT_REFIT)
    ap.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v],
                    default=["refit", "no-refit", "rmax2"],
                    help="calibrated budget ladders: refit, no-refit, rmaxK, refitN, fisherN "
                         "(comma "
                         "separated; rmaxK also adds a data-free ladder at max rank K)")
    rd_served.add_quant_weights_option(ap)
    ap.add_argument("--curve", action="store_true",
                    help="also rd_served's calibrated points at 1/6, 1/3, 2/3 of the baseline")
    ap.add_argument("--packets", default=None, help="write every packet to this folder")
    args = ap.parse_args(argv)
    for v in args.variants:
        if not VARIANT.fullmatch(v):
            ap.error(f"unknown variant {v!r} (refit, no-refit, rmaxK, refitN, fisherN)")
    args.calib_texts = args.calib_images  # ServedBench's name for the calibration size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from solar_edge.exporters.vit_digits import TASKS, task

    torch.set_num_threads(1)
    bundle = load_bundle(args.vit / "bundle")
    names = [n for n in TASKS if not args.only or n in args.only]
    run(args, [(n, args.vit / n / "adapter", task(n)) for n in names], args.vit / "base",
        bundle, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
