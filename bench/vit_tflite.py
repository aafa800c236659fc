"""The project's ViT on TFLite (rpi4 profile): lossless packets served by the patched
``.tflite`` against the same bundle's ONNX graph and PEFT ``merge_and_unload``; inference of
the patched graph against a graph converted with the adapter baked in; apply and switch.

    nice -n 10 python scripts/pretrain_vit.py          # artifacts/vit (a few minutes)
    nice -n 10 python bench/vit_tflite.py [--vit artifacts/vit] [--repeat 100]

Needs the ``convert`` extra (``litert-torch``). Exports ``artifacts/vit/bundle-rpi4`` once.
For each task of ``scripts/pretrain_vit.py``: its lossless packet (float32 factors and head,
signed) and the held-out images written as ``.npy`` files, answered by ``solar-edge run
--image FOLDER --json`` in a subprocess, once on the default ``tflite`` mechanism and once
on ``initializer`` (the bundle's ONNX graph); labels and logits compared with each other and
with torch. Then, on ``digits-5-9``: the bundle patched by its packet against the bundle
exported from the merged model (``baked``), both on TFLite with one thread, graph runs
alternating, batch 1 and 64 (the graph is static batch 1: 64 invocations); and apply (verify,
decode, patch, new interpreter, probe) and switch between the two cached adapters on
``tflite`` and ``initializer``. Medians and minima of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from vit import elapsed_ms, ratio, summary, time_switches, torch_merged

from solar_edge.exporters.compress import prepare_adapter, sign_packet
from solar_edge.exporters.compress_measure import lossless_records
from solar_edge.exporters.pipeline import export_bundle
from solar_edge.exporters.vit_digits import TASKS, task
from solar_edge.format import signing
from solar_edge.format.bundle import Bundle, load_bundle
from solar_edge.methods.peft_files import read_adapter
from solar_edge.runtime.engine import EdgeRuntime
from solar_edge.runtime.images import ImageSpec


def _cli_answers(bundle: Path, packet: Path, pub: Path, images: Path,
                 mechanism: str | None) -> tuple[np.ndarray, list[str]]:
    cmd = [sys.executable, "-m", "solar_edge.cli", "run", "--bundle", str(bundle),
           "--packet", str(packet), "--trusted-key", str(pub), "--image", str(images), "--json"]
    if mechanism:
        cmd += ["--mechanism", mechanism]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr}")
    result = json.loads(done.stdout)
    if result["mechanism"] != (mechanism or "tflite"):
        raise SystemExit(f"served by {result['mechanism']}, not {mechanism or 'tflite'}")
    answers = result["answers"]
    order = sorted(range(len(answers)), key=lambda i: answers[i]["image"])
    return (np.array([answers[i]["logits"] for i in order]),
            [answers[i]["label"] for i in order])


def one_task(root: Path, bundle: Bundle, key: Any, name: str, work: Path) -> dict[str, Any]:
    """Held-out answers of ``solar-edge run`` on TFLite and ONNX against torch."""
    data = task(name)
    images, truth = data.test.images, data.test.labels
    folder = work / name
    folder.mkdir()
    for i, image in enumerate(images):
        np.save(folder / f"{i:04d}.npy", image)
    prep = prepare_adapter(read_adapter(root / name / "adapter"), bundle)
    packet, _ = sign_packet(prep, lossless_records(prep), key, name)
    (work / f"{name}.slr").write_bytes(packet)
    pub = work / "key.pub"
    tfl, tfl_labels = _cli_answers(bundle.root, work / f"{name}.slr", pub, folder, None)
    ort, ort_labels = _cli_answers(bundle.root, work / f"{name}.slr", pub, folder,
                                   "initializer")
    spec = ImageSpec.from_manifest(bundle.manifest["model"])
    want = torch_merged(root / "base", root / name / "adapter", spec, images)
    labels = json.loads((root / name / "adapter" / "config.json").read_text())["id2label"]
    want_labels = np.array([labels[str(int(i))] for i in want.argmax(1)])
    truth_labels = np.array([labels[str(int(i))] for i in truth])
    got = np.array(tfl_labels)
    row = {"task": name, "held_out": len(images), "packet_bytes": len(packet),
           "tflite_accuracy": float((got == truth_labels).mean()),
           "labels_tflite_eq_onnx": int((got == np.array(ort_labels)).sum()),
           "labels_tflite_eq_torch_merge": int((got == want_labels).sum()),
           "max_logit_diff_tflite_onnx": float(np.abs(tfl - ort).max()),
           "max_logit_diff_tflite_torch": float(np.abs(tfl - want).max()),
           "max_logit_diff_onnx_torch": float(np.abs(ort - want).max())}
    print(json.dumps(row), flush=True)
    return row


def _baked_bundle(root: Path, name: str, out: Path) -> Path:
    """The rpi4 bundle of the base with ``name``'s adapter merged in (PEFT merge_and_unload)."""
    from peft import PeftModel
    from transformers import ViTForImageClassification

    adapter = root / name / "adapter"
    cfg = json.loads((adapter / "config.json").read_text())
    model = ViTForImageClassification.from_pretrained(
        root / "base", num_labels=len(cfg["id2label"]), ignore_mismatched_sizes=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    merged.save_pretrained(out / "merged")
    pre = "preprocessor_config.json"
    (out / "merged" / pre).write_bytes((root / "base" / pre).read_bytes())
    export_bundle(str(out / "merged"), "rpi4", out / "bundle")
    return out / "bundle"


def timings(root: Path, bundle: Bundle, key: Any, work: Path, repeat: int) -> dict[str, Any]:
    packets = {name: (work / f"{name}.slr").read_bytes() for name in TASKS}
    baked = EdgeRuntime(str(_baked_bundle(root, TASKS[0], work / "baked")),
                        [key.public_key()], threads=1)
    prep = prepare_adapter(read_adapter(root / TASKS[0] / "adapter"), bundle)
    records = lossless_records(prep)
    newer = [sign_packet(prep, records, key, TASKS[0], version=v)[0] for v in range(2, 22)]
    runtimes: dict[str, EdgeRuntime] = {}
    apply_ms: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    for mechanism in ("tflite", "initializer"):
        rt = EdgeRuntime(str(bundle.root), [key.public_key()], mechanism=mechanism, threads=1)
        for name in TASKS:
            rt.apply(packets[name])
        for data in newer:  # each a newer version of the first adapter: a full apply
            apply_ms.setdefault(f"{mechanism} apply", []).append(
                elapsed_ms(lambda rt=rt, data=data: rt.apply(data)))
            for step, ms in rt.last_timings.items():
                steps.setdefault(f"{mechanism} apply {step}", []).append(ms)
        rt.switch(TASKS[0])
        runtimes[mechanism] = rt
    patched = runtimes["tflite"]
    images = task(TASKS[0]).test.images
    out: dict[str, Any] = {}
    served = {"patched": patched, "baked": baked}
    times: dict[str, list[float]] = {}
    for n in (1, 64):
        feeds = patched.family.feeds(list(images[:n]))
        got = {k: rt.run_graph(feeds)[0] for k, rt in served.items()}
        out[f"max_hidden_diff_patched_baked_b{n}"] = float(
            np.abs(got["patched"] - got["baked"]).max())
        for _ in range(repeat):
            for label, rt in served.items():
                times.setdefault(f"{label} graph b{n}", []).append(
                    elapsed_ms(lambda rt=rt, feeds=feeds: rt.run_graph(feeds)))
    time_switches(runtimes, repeat, times)
    out.update({k: summary(v) for k, v in {**times, **apply_ms, **steps}.items()})
    for n in (1, 64):
        out[f"patched_over_baked_b{n}"] = ratio(out[f"patched graph b{n}"],
                                                out[f"baked graph b{n}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit", type=Path, default=Path("artifacts/vit"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    bundle_dir = args.vit / "bundle-rpi4"
    export_s = None
    if not (bundle_dir / "manifest.json").is_file():
        t = time.perf_counter()
        export_bundle(str(args.vit / "base"), "rpi4", bundle_dir)
        export_s = round(time.perf_counter() - t, 1)
    bundle = load_bundle(bundle_dir)
    key = signing.generate_private_key()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        signing.save_public_key(key.public_key(), work / "key.pub")
        report = {"export_seconds": export_s,
                  "tasks": [one_task(args.vit, bundle, key, name, work) for name in TASKS],
                  "timings": timings(args.vit, bundle, key, work, args.repeat)}
    out = args.out or args.vit / "report-tflite.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
