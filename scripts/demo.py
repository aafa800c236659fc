"""End-to-end demo on the embedded MiniLM (README's `make demo`).

Server side: export MiniLM for a Raspberry Pi 5 profile, train two real LoRA adapters on
two offline text tasks, compress each into a signed SOLAR packet, publish them in a TUF
repository. Device side: a real HTTP server on loopback throttled to an LTE-M link, the
update agent downloads, verifies and applies both packets through the ONNX Runtime
runtime, answers held-out inputs, and switches between the two tasks.

    python scripts/demo.py [--out out/demo] [--link ltem] [--budget 4000] [--refit 120]
        [--eval 300]

Artifacts (bundle, adapters, packets, repository) are kept under --out and reused on a
second run; pass --fresh to rebuild everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import zstandard  # noqa: E402

TASKS = ("stdlib-docs", "pydoc-topics")
ADAPTER_KIND = "lora-qv-r8"
SAMPLE_COUNT = 3


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def export(out: Path, profile: str) -> Path:
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.exporters.progress import Progress
    from solar_edge.format.bundle import load_bundle

    bundle_dir = out / "bundle"
    if bundle_dir.exists():
        try:
            load_bundle(bundle_dir)
            print(f"reusing verified bundle {bundle_dir}")
            return bundle_dir
        except Exception as exc:  # noqa: BLE001 - rebuild whatever is wrong with it
            print(f"rebuilding bundle ({exc})")
    t = time.perf_counter()
    export_bundle(None, profile, bundle_dir, overwrite=True, progress=Progress(enabled=True))
    print(f"exported MiniLM for {profile} in {human_seconds(time.perf_counter() - t)}")
    return bundle_dir


def train(out: Path, steps: int, max_test: int) -> dict[str, Path]:
    from solar_edge.exporters.tasks import load_task
    from solar_edge.exporters.train import TrainConfig, load_base, train_adapter

    dirs = {}
    base = None
    for task_name in TASKS:
        adir = out / "adapters" / task_name
        dirs[task_name] = adir
        if (adir / "task.json").exists():
            print(f"reusing adapter {adir}")
            continue
        base = base or load_base()
        t = time.perf_counter()
        config = TrainConfig(kind=ADAPTER_KIND, steps=steps, max_test=max_test)
        result = train_adapter(load_task(task_name), adir, config, base=base)
        m = result.metrics
        took = human_seconds(time.perf_counter() - t)
        print(f"trained {ADAPTER_KIND} on {task_name}: held-out accuracy "
              f"{100 * m['accuracy']:.1f}% (n={m['n']}) in {took}")
    return dirs


def compress(adapter_dir: Path, bundle, key, version: int, budget: int,
             refit_steps: int) -> tuple[bytes, dict]:
    """The compress pipeline of ``solar-edge compress --metric fisher --refit N``."""
    from solar_edge.exporters.compress import CompressOptions, compress_adapter

    task = json.loads((adapter_dir / "task.json").read_text())
    options = CompressOptions(budget=budget, metric="fisher", calib=128,
                              max_rank=8, refit_steps=refit_steps)
    result = compress_adapter(adapter_dir, bundle, key, options, adapter_id=task["task"],
                              version=version)
    kept = [f for f in result.alloc.chosen.values() if f.kind is not None]
    return result.data, {"adapter_id": task["task"], "layers": len(kept),
                         "ranks": sorted({f.rank for f in kept}),
                         "bits": sorted({f.bits for f in kept}),
                         "refit_loss": result.refit_loss, "metrics": task.get("metrics", {})}


def lora_sizes(adapter_dir: Path) -> tuple[int, int]:
    """(fp16 safetensors bytes, zstd-19 of them) for the adapter's LoRA factors."""
    from safetensors.numpy import load_file, save

    tensors = {k: v.astype(np.float16) for k, v in
               load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    raw = save(tensors)
    return len(raw), len(zstandard.ZstdCompressor(level=19).compress(raw))


def accuracy(runtime, texts: list[str], labels: list[int], names: list[str]) -> float:
    predicted = []
    for i in range(0, len(texts), 32):
        predicted += runtime.classify(texts[i:i + 32])
    return float(np.mean([p == names[y] for p, y in zip(predicted, labels, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--profile", default="rpi5")
    ap.add_argument("--link", default="ltem", help="link profile the server emulates")
    ap.add_argument("--budget", type=int, default=4000, help="packet byte budget")
    ap.add_argument("--refit", type=int, default=120,
                    help="output-matching refit steps per packet (0: off)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    ap.add_argument("--eval", type=int, default=300, help="held-out examples per task")
    ap.add_argument("--fresh", action="store_true", help="rebuild every artifact")
    args = ap.parse_args(argv)

    from solar_edge.devices.cli import build_runtime_agent
    from solar_edge.devices.repo import Repository, root_path, signer_from_key
    from solar_edge.devices.server import RepoServer
    from solar_edge.exporters.tasks import load_task
    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle
    from solar_edge.profiles.links import load_links, transfer_time

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    step(f"1/6 export MiniLM for device profile {args.profile}")
    bundle_dir = export(out, args.profile)
    bundle = load_bundle(bundle_dir)
    model_bytes = sum(f["bytes"] for path, f in bundle.manifest["files"].items()
                      if path.endswith((".onnx", ".data")) or path.startswith("weights/"))
    basis_bytes = sum(f["bytes"] for path, f in bundle.manifest["files"].items()
                      if path.startswith("basis/"))
    print(f"bundle: {len(bundle.layers)} adaptable weights, graph+weights "
          f"{human_bytes(model_bytes)}, bases {human_bytes(basis_bytes)} (sent once per device)")

    step(f"2/6 train {ADAPTER_KIND} adapters on two offline text tasks")
    adapter_dirs = train(out, args.steps, args.eval)

    step(f"3/6 compress into signed packets (budget {args.budget} B, K-FAC allocation, "
         f"refit {args.refit} steps)")
    key = signing.generate_private_key()
    packets, info = {}, {}
    for task_name, adir in adapter_dirs.items():
        data, meta = compress(adir, bundle, key, version=1, budget=args.budget,
                              refit_steps=args.refit)
        packets[task_name], info[task_name] = data, meta
        fp16, zst = lora_sizes(adir)
        meta.update(packet_bytes=len(data), lora_fp16_bytes=fp16, lora_zstd_bytes=zst)
        (out / f"{task_name}.slr").write_bytes(data)
        refit = meta["refit_loss"]
        print(f"{task_name}: packet {len(data)} B ({meta['layers']} layers, rank "
              f"{'/'.join(map(str, meta['ranks']))} at {'/'.join(map(str, meta['bits']))} bits"
              + (f", refit output loss {refit[0]:.3f} -> {refit[1]:.3f}" if refit else "")
              + f"); LoRA fp16 {fp16} B, zstd {zst} B -> {fp16 / len(data):.0f}x smaller")

    step(f"4/6 publish (TUF) and serve on loopback over a throttled {args.link} link")
    links = load_links()
    link = links[args.link]
    repo_dir = out / "repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = Repository(repo_dir, signer_from_key(key))
    repo.publish(list(packets.values()))
    state_dir = out / "device-state"
    shutil.rmtree(state_dir, ignore_errors=True)
    with RepoServer(repo_dir, link=link) as server:
        print(f"serving {repo_dir} at {server.url} as {link.name}: "
              f"{link.rate_bps / 1000:.0f} kbit/s, {link.latency_s * 1e3:.0f} ms latency")
        step("5/6 device agent: refresh metadata, download, verify, apply")
        agent = build_runtime_agent(server.url, bundle_dir, args.profile, state_dir,
                                    [key.public_key()], root=root_path(repo_dir).read_bytes())
        agent.start()
        t = time.perf_counter()
        outcomes = agent.run()
        download_s = time.perf_counter() - t
        wire = server.bytes_sent
    for o in outcomes:
        print(f"  {o}")
    print(f"agent cycle (TUF refresh + {len(outcomes)} packets + apply) took "
          f"{human_seconds(download_s)} over emulated {link.name}"
          + f", {wire} bytes served")
    if any(o.error for o in outcomes):
        print("an update failed; see above", file=sys.stderr)
        return 1

    step("6/6 answer held-out inputs, switch tasks")
    runtime = agent.applier.runtime
    rows = []
    for task_name in TASKS:
        task = load_task(task_name)
        n = min(args.eval, len(task.test.texts))
        texts, labels = task.test.texts[:n], task.test.labels[:n]
        t = time.perf_counter()
        agent.switch(task_name)
        switch_ms = (time.perf_counter() - t) * 1e3
        names = list(task.label_names)
        acc = accuracy(runtime, texts, labels, names)
        for text, label in zip(texts[:SAMPLE_COUNT], runtime.classify(texts[:SAMPLE_COUNT]),
                               strict=True):
            print(f"  [{task_name}] {text[:70]!r:74} -> {label}")
        meta = info[task_name]
        torch_acc = meta["metrics"].get("accuracy")
        rows.append((task_name, meta, acc, n, torch_acc, switch_ms))

    apply_ms = {o.adapter_id: o.apply_s * 1e3 for o in outcomes}
    print("\n" + "=" * 100)
    print(f"{'task':<13} {'packet':>8} {'LoRA fp16':>10} {'LoRA zstd':>10} {'ratio':>6} "
          f"{'acc (device)':>13} {'acc (torch, uncompressed)':>26} {'switch':>8}")
    for task_name, meta, acc, n, torch_acc, switch_ms in rows:
        torch_txt = f"{100 * torch_acc:.1f}%" if torch_acc is not None else "n/a"
        ratio = meta["lora_fp16_bytes"] / meta["packet_bytes"]
        print(f"{task_name:<13} {meta['packet_bytes']:>7}B {meta['lora_fp16_bytes']:>9}B "
              f"{meta['lora_zstd_bytes']:>9}B {ratio:>5.0f}x "
              f"{100 * acc:>7.1f}% n={n:<3} {torch_txt:>26} {switch_ms:>6.0f}ms")
    print("\napply on the device (verify, decode, patch, health check, commit): "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in apply_ms.items())
          + f"; runtime mechanism: {runtime.mechanism}")
    first = rows[0][1]
    print("\ndownload time per link (computed from the link model, protocol overheads included):")
    print(f"{'link':<11} {'full model':>12} {'LoRA fp16':>11} {'LoRA zstd':>11} {'packet':>9}")
    for name, lk in links.items():
        times = [transfer_time(b, lk) for b in (model_bytes, first["lora_fp16_bytes"],
                                                 first["lora_zstd_bytes"], first["packet_bytes"])]
        print(f"{name:<11} " + " ".join(f"{human_seconds(t):>11}" for t in times))
    summary = {"rows": [{"task": r[0], **r[1], "device_accuracy": r[2], "n": r[3],
                         "switch_ms": r[5], "apply_ms": apply_ms.get(r[0])} for r in rows],
               "download_s": download_s, "link": link.name, "model_bytes": model_bytes,
               "basis_bytes": basis_bytes, "total_s": time.perf_counter() - started}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\ndemo finished in {human_seconds(time.perf_counter() - started)}; "
          f"summary in {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
