"""The ViT digits adapters on the board: equality with PEFT, accuracy per packet size, the
LoRA-slot graph's inference overhead over baked weights, and switch time.

    nice -n 10 python scripts/pretrain_vit.py              # artifacts/vit (a few minutes)
    nice -n 10 python bench/vit.py [--vit artifacts/vit] [--out artifacts/vit/report.json]

For each task of ``scripts/pretrain_vit.py`` on its held-out images: the head-only baseline
and the uncompressed adapter (torch, from its ``metrics.json``); plain baselines (the
adapter's fp16 safetensors size; its own factors at int8 / int4 / int3 in signed packets with
the same head, as ``bench/rd_served.py`` builds them); the lossless packet (float32
factors and head) served by the runtime against PEFT ``merge_and_unload`` in torch (label
agreement, largest logit difference); packets at several budgets, data-free (``fro``) and
calibrated (``fisher`` + refit on the task's folder of 64 unlabelled PNGs), served by the
runtime. Then, on the ``digits-5-9`` adapter: inference of the ``lora`` mechanism (unmerged
slots) against ``initializer`` (the weights baked into the graph), batch 1 and 64, and the
switch between the two adapters, the two mechanisms' calls alternating; medians and minima
of ``--repeat`` runs; one ORT thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rd_packets import lora_int_records, safetensors_bytes

from solar_edge.errors import BudgetError
from solar_edge.exporters.compress import (
    CompressOptions,
    compress_adapter,
    prepare_adapter,
    sign_packet,
)
from solar_edge.exporters.compress_measure import lossless_records
from solar_edge.exporters.pipeline import export_bundle
from solar_edge.exporters.vit_digits import TASKS, task
from solar_edge.format import signing
from solar_edge.format.bundle import Bundle, load_bundle
from solar_edge.format.records import ValueFormat
from solar_edge.methods.peft_files import read_adapter
from solar_edge.runtime.engine import EdgeRuntime
from solar_edge.runtime.images import ImageSpec, pixel_values

BUDGETS = (8000, 4000, 2500, 1800, 1400)  # bytes; below the head + metadata: skipped


def _labels(rt: EdgeRuntime, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.concatenate([rt.infer(list(images[i:i + 64])) for i in range(0, len(images), 64)])
    return logits, logits.argmax(1)


def torch_merged(base: Path, adapter: Path, spec: ImageSpec, images: np.ndarray) -> np.ndarray:
    from peft import PeftModel
    from transformers import ViTForImageClassification

    cfg = json.loads((adapter / "config.json").read_text())
    model = ViTForImageClassification.from_pretrained(
        base, num_labels=len(cfg["id2label"]), ignore_mismatched_sizes=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        return merged(pixel_values=torch.from_numpy(pixel_values(list(images), spec))).logits \
            .numpy()


def one_task(root: Path, bundle: Bundle, key: Any, name: str) -> dict[str, Any]:
    data = task(name)
    folder = root / name
    metrics = json.loads((folder / "metrics.json").read_text())
    spec = ImageSpec.from_manifest(bundle.manifest["model"])
    images, truth = data.test.images, data.test.labels
    prep = prepare_adapter(read_adapter(folder / "adapter"), bundle)
    lossless, _ = sign_packet(prep, lossless_records(prep), key, name)
    rt = EdgeRuntime(str(bundle.root), [key.public_key()])
    rt.apply(lossless)
    got, got_labels = _labels(rt, images)
    want = torch_merged(root / "base", folder / "adapter", spec, images)
    row: dict[str, Any] = {
        "task": name, "held_out": int(len(truth)),
        "head_only_accuracy": metrics["head_only_accuracy"],
        "adapter_accuracy_torch": metrics["adapter_accuracy"],
        "merged_accuracy_torch": float((want.argmax(1) == truth).mean()),
        "lossless": {"bytes": len(lossless), "accuracy": float((got_labels == truth).mean()),
                     "labels_equal_merge_and_unload": int((got_labels == want.argmax(1)).sum()),
                     "max_abs_logit_diff": float(np.abs(got - want).max())},
        "plain": [{"baseline": "fp16 safetensors (file only, unsigned)",
                   "bytes": safetensors_bytes(folder / "adapter" / "adapter_model.safetensors",
                                              "float16")}],
        "packets": []}
    for i, fmt in enumerate((ValueFormat.INT8, ValueFormat.INT4, ValueFormat.INT3)):
        data, _ = sign_packet(prep, lora_int_records(prep.updates, fmt) + prep.extras.records,
                              key, name, version=100 + i)
        rt.apply(data)
        _, labels = _labels(rt, images)
        row["plain"].append({"baseline": f"own factors {fmt.name.lower()} (signed packet)",
                             "bytes": len(data), "accuracy": float((labels == truth).mean())})
        print(json.dumps({"task": name, **row["plain"][-1]}), flush=True)
    for budget in BUDGETS:
        for mode in ("fro", "fisher"):
            opts = CompressOptions(budget=budget, metric=mode) if mode == "fro" else \
                CompressOptions(budget=budget, metric="fisher", calib_data=folder / "calib",
                                model_dir=root / "base", refit_steps=100)
            try:
                packet = compress_adapter(folder / "adapter", bundle, key, opts,
                                          adapter_id=name, version=200 + len(row["packets"]))
            except BudgetError as exc:
                print(f"{name} {budget} B: {exc}", flush=True)
                continue
            rt.apply(packet.data)
            _, labels = _labels(rt, images)
            row["packets"].append({"budget": budget, "metric": mode, "bytes": len(packet.data),
                                   "accuracy": float((labels == truth).mean()),
                                   "agreement_with_lossless":
                                       float((labels == got_labels).mean())})
            print(json.dumps({"task": name, **row["packets"][-1]}), flush=True)
    return row


def elapsed_ms(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}


def time_switches(runtimes: dict[str, Any], repeat: int, times: dict[str, list[float]]) -> None:
    """``repeat`` switches between the two tasks on every runtime, calls alternating."""
    for i in range(repeat):
        for mechanism, rt in runtimes.items():
            times.setdefault(f"{mechanism} switch", []).append(
                elapsed_ms(lambda rt=rt, to=TASKS[(i + 1) % 2]: rt.switch(to)))


def ratio(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    """Two timing summaries' ratio, of medians and of minima."""
    return {"of_medians": round(num["median_ms"] / den["median_ms"], 3),
            "of_minima": round(num["min_ms"] / den["min_ms"], 3)}


# What overhead() serves: the default (``lora-native`` on the ``lora-plain`` graph), ``lora``
# on it, both on the full slot graph, and the weights merged in place (the baseline, last).
SERVED = ("lora-native", "lora", "lora-native-full", "lora-full", "initializer")


def overhead(root: Path, bundle: Bundle, key: Any, repeat: int) -> dict[str, Any]:
    """Every way of serving in :data:`SERVED` serves the same adapter; their calls alternate
    so that load from other processes on a shared machine falls on all alike."""
    packets = {}
    for name in TASKS:
        prep = prepare_adapter(read_adapter(root / name / "adapter"), bundle)
        packets[name], _ = sign_packet(prep, lossless_records(prep), key, name)
    images = task(TASKS[0]).test.images
    runtimes = {}
    for served in SERVED:
        mechanism = served.removesuffix("-full")
        rt = EdgeRuntime(str(bundle.root), [key.public_key()], mechanism=mechanism, threads=1)
        if served.endswith("-full"):  # the slot graph with the DoRA-scale and bias nodes
            rt.backend.plain_path = None  # type: ignore[attr-defined]
        for name in TASKS:
            rt.apply(packets[name])
        rt.switch(TASKS[0])
        runtimes[served] = rt
    times: dict[str, list[float]] = {}
    for n in (1, 64):
        batch = list(images[:n])
        for _ in range(repeat):
            for mechanism, rt in runtimes.items():
                times.setdefault(f"{mechanism} infer b{n}", []).append(
                    elapsed_ms(lambda rt=rt, batch=batch: rt.infer(batch)))
    time_switches(runtimes, repeat, times)
    out: dict[str, Any] = {key: summary(v) for key, v in times.items()}
    for n in (1, 64):
        for served in SERVED[:-1]:
            out[f"{served}_over_baked_b{n}"] = ratio(out[f"{served} infer b{n}"],
                                                     out[f"initializer infer b{n}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit", type=Path, default=Path("artifacts/vit"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle_dir = args.vit / "bundle"
    manifest = bundle_dir / "manifest.json"
    if not manifest.is_file() or "lora-plain" not in json.loads(manifest.read_text())[
            "onnx"].get("variants", {}):  # new, or exported before the ViT had lora-plain
        export_bundle(str(args.vit / "base"), "x86-64", bundle_dir, overwrite=True)
    bundle = load_bundle(bundle_dir)
    key = signing.generate_private_key()
    report = {"tasks": [one_task(args.vit, bundle, key, name) for name in TASKS],
              "overhead": overhead(args.vit, bundle, key, args.repeat)}
    out = args.out or args.vit / "report.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
