"""Patching mechanisms side by side on real MiniLM: apply, switch, inference, peak RSS.

    python bench/runtime.py --bundle BUNDLE_DIR [--out runtime-bench.json] [--threads 1]

For every ORT mechanism (``initializer``, ``iobinding``, ``lora``, ``lora-native``,
``recreate``): apply latency (verify + decode + stage + health check + commit) and switch
latency between two cached adapters; inference latency of the graph it serves vs the baked
graph (plain session, prepacking on); peak RSS during apply (a fresh subprocess per
mechanism, RSS sampled every millisecond) vs model size. Baselines in the same run: PEFT
``from_pretrained`` + ``merge_and_unload`` in torch, PEFT switch (unmerge, set_adapter,
merge), and re-creating an ORT session with merged weights. Adapters are real PEFT LoRA
r=8 on query/value of MiniLM (random-initialised, saved by PEFT), compressed by the codec
(INT8 factored cores in the basis, rank <= 8). Medians over ``--repeat`` runs; a shared
machine is noisy, so the minimum is printed too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "Return the absolute value of the argument.",
    "Open a file and return a stream.",
    "The quick brown fox jumps over the lazy dog.",
    "Edge boards receive signed adapter packets over slow links.",
    "Compute the greatest common divisor of two integers.",
    "Parse a URL into six components.",
    "Sort a list in place using only less-than comparisons.",
    "A context manager that suppresses the given exceptions.",
]
MECHS = ["initializer", "iobinding", "lora", "lora-native", "recreate"]


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2)}


# --- inputs -----------------------------------------------------------------------------------

def prepare_bundle(src: Path, work: Path) -> Path:
    from solar_edge.exporters.graph_variants import add_variants_to_bundle

    manifest = json.loads((src / "manifest.json").read_text())
    variants = manifest["onnx"].get("variants") or {}
    if {"inputs", "lora"} <= set(variants):
        return src
    dst = work / "bundle"
    shutil.copytree(src, dst)
    add_variants_to_bundle(str(dst))
    return dst


def make_peft_adapters(work: Path, n: int = 2) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from solar_edge.exporters.train import minilm_path

    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        base = AutoModel.from_pretrained(minilm_path())
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                         init_lora_weights=False)
        model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        out = work / f"adapter{i}"
        model.save_pretrained(str(out))
        dirs.append(out)
    return dirs


def make_packets(bundle_dir: Path, adapters: list[Path], key, versions: int) -> list[list[bytes]]:
    from solar_edge.encode.solar import CodecConfig, encode
    from solar_edge.format.bundle import load_bundle
    from solar_edge.format.packet import PacketHeader
    from solar_edge.format.writer import encode_packet
    from solar_edge.methods.matching import match_to_bundle
    from solar_edge.methods.peft_files import read_adapter

    bundle = load_bundle(bundle_dir)
    out = []
    for i, path in enumerate(adapters):
        ups = match_to_bundle(read_adapter(path).updates, bundle.manifest["layers"])
        cfg = CodecConfig(seed=i, representation="factored_core", max_rank=8)  # LoRA-like k
        res = encode(ups, {lid: bundle.layer_basis(lid) for lid in ups}, cfg)
        out.append([encode_packet(PacketHeader(bundle.fingerprint, f"task{i}", v, {"task": str(i)}),
                                  res.header, res.records, key) for v in range(1, versions + 1)])
    return out


# --- measurements -----------------------------------------------------------------------------

def bench_mechanism(bundle_dir: Path, mech: str, packets, key, repeat: int,
                    threads: int) -> tuple[dict, Callable[[], object]]:
    from solar_edge.runtime.engine import EdgeRuntime

    t = time.perf_counter()
    rt = EdgeRuntime(str(bundle_dir), [key.public_key()], mechanism=mech, threads=threads,
                     max_cached=4)
    load_ms = (time.perf_counter() - t) * 1e3
    feeds = rt.family.feeds(SENTENCES)
    apply_ms, steps = [], []
    for v in range(repeat):  # a new version each time: full verify + decode + stage + commit
        t = time.perf_counter()
        rt.apply(packets[v % 2][v // 2])
        apply_ms.append((time.perf_counter() - t) * 1e3)
        steps.append(rt.last_timings)
    switch_ms = []
    for i in range(repeat):
        target = f"task{i % 2}"
        t = time.perf_counter()
        rt.switch(target)
        switch_ms.append((time.perf_counter() - t) * 1e3)
    breakdown = {k: round(statistics.median(s[k] for s in steps), 2) for k in steps[0]}
    patch = [s["stage_ms"] + s["probe_ms"] + s["commit_ms"] for s in steps]
    row = {"load_ms": round(load_ms, 1), "apply": summary(apply_ms), "patch": summary(patch),
           "switch": summary(switch_ms), "apply_steps_median_ms": breakdown,
           "cache_bytes": rt.active.cache_bytes}
    return row, (lambda: rt.backend.run(feeds))


def bench_baked(bundle_dir: Path, repeat: int, threads: int) -> tuple[dict, Callable[[], object]]:
    from solar_edge.runtime.backends.onnxruntime import session_options
    from solar_edge.runtime.bundle_parts import open_bundle
    from solar_edge.runtime.families.text_encoder import TextEncoder

    parts = open_bundle(bundle_dir)
    path = str(parts.bundle.onnx_path)
    t = time.perf_counter()
    import onnxruntime as ort

    sess = ort.InferenceSession(path, session_options(threads=threads),
                                providers=["CPUExecutionProvider"])
    create_ms = (time.perf_counter() - t) * 1e3
    names = [i.name for i in sess.get_inputs()]
    feeds = TextEncoder(parts.tokenizer_json())(SENTENCES, names)
    sess.run(None, feeds)
    return {"create_ms": round(create_ms, 1)}, (lambda: sess.run(None, feeds))


def bench_peft(adapters: list[Path], repeat: int,
               threads: int) -> tuple[dict, Callable[[], object]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from solar_edge.exporters.train import minilm_path

    torch.set_num_threads(threads or torch.get_num_threads())
    base = AutoModel.from_pretrained(minilm_path()).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    load_merge = []
    for _ in range(repeat):
        fresh = copy.deepcopy(base)
        t = time.perf_counter()
        PeftModel.from_pretrained(fresh, str(adapters[0])).merge_and_unload()
        load_merge.append((time.perf_counter() - t) * 1e3)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[0]), adapter_name="task0")
    model.load_adapter(str(adapters[1]), adapter_name="task1")
    model.eval()
    model.set_adapter("task0")
    model.merge_adapter()
    switch = []
    for i in range(repeat):
        t = time.perf_counter()
        model.unmerge_adapter()
        model.set_adapter(f"task{(i + 1) % 2}")
        model.merge_adapter()
        switch.append((time.perf_counter() - t) * 1e3)
    def infer() -> None:
        with torch.no_grad():
            model(**enc)

    return {"load_adapter_merge": summary(load_merge), "switch": summary(switch)}, infer


def rss_child(bundle_dir: str, mech: str, packet_path: str, pub_path: str) -> None:
    """Subprocess: peak RSS sampled every ms during one apply."""
    import psutil

    from solar_edge.format import signing
    from solar_edge.runtime.engine import EdgeRuntime

    proc = psutil.Process()
    rt = EdgeRuntime(bundle_dir, [signing.load_public_key(pub_path)], mechanism=mech, threads=1)
    data = Path(packet_path).read_bytes()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    rt.apply(data)
    done.set()
    th.join()
    after = proc.memory_info().rss
    print(json.dumps({"rss_before": before, "rss_peak": max(peak[0], after), "rss_after": after}))


def bench_rss(bundle_dir: Path, mech: str, packet: bytes, pub: Path, work: Path) -> dict:
    path = work / f"rss-{mech}.slr"
    path.write_bytes(packet)
    res = subprocess.run([sys.executable, __file__, "--rss-child", mech, "--bundle",
                          str(bundle_dir), "--packet", str(path), "--pub", str(pub)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def model_sizes(bundle_dir: Path) -> dict:
    from solar_edge.format.bundle import load_bundle

    b = load_bundle(bundle_dir)
    adapted = sum(4 * layer.shape[0] * layer.shape[1] for layer in b.layers)
    onnx_bytes = b.onnx_path.stat().st_size
    weights = sum((b.root / layer.files["weight"]).stat().st_size for layer in b.layers)
    return {"adaptable_weights_bytes": adapted, "onnx_file_bytes": onnx_bytes,
            "external_weight_files_bytes": weights}


# --- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=Path("runtime-bench.json"))
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mechanisms", default=",".join(MECHS))
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--packet", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pub", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(str(args.bundle), args.rss_child, args.packet, args.pub)
        return

    from solar_edge.format import signing

    mechs = args.mechanisms.split(",")
    with tempfile.TemporaryDirectory(prefix="solar-edge-bench-") as tmp:
        work = Path(tmp)
        bundle_dir = prepare_bundle(args.bundle, work)
        key = signing.generate_private_key()
        pub = signing.save_public_key(key, work / "bench.pub")
        adapters = make_peft_adapters(work)
        packets = make_packets(bundle_dir, adapters, key, versions=args.repeat // 2 + 2)
        baked, run_baked = bench_baked(bundle_dir, args.repeat, args.threads)
        peft, run_peft = bench_peft(adapters, args.repeat, args.threads)
        results: dict = {"packet_bytes": len(packets[0][0]), "threads": args.threads,
                         "repeat": args.repeat, "sizes": model_sizes(bundle_dir),
                         "baked": baked, "peft": peft, "mechanisms": {}}
        runners = {"baked": run_baked, "peft": run_peft}
        for mech in mechs:
            row, runners[mech] = bench_mechanism(bundle_dir, mech, packets, key, args.repeat,
                                                 args.threads)
            row["rss"] = bench_rss(bundle_dir, mech, packets[0][0], pub, work)
            results["mechanisms"][mech] = row
        # inference: all graphs timed round-robin in the same rounds, so load on a shared
        # machine hits them alike
        times: dict[str, list[float]] = {k: [] for k in runners}
        for fn in runners.values():
            fn()
        for _ in range(args.repeat * 3):
            for k, fn in runners.items():
                times[k].extend(timed(fn, 1))
        baked["infer"], peft["infer"] = summary(times["baked"]), summary(times["peft"])
        for mech in mechs:
            results["mechanisms"][mech]["infer"] = summary(times[mech])
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {args.out}")


def print_table(r: dict) -> None:
    peft, baked = r["peft"], r["baked"]
    recreate = r["mechanisms"].get("recreate")
    size_mb = r["sizes"]["adaptable_weights_bytes"] / 2**20
    print(f"packet {r['packet_bytes']} B; adaptable weights {size_mb:.1f} MiB; "
          f"threads {r['threads']}; median (min) of {r['repeat']}")
    head = (f"{'mechanism':12s} {'apply ms':>16s} {'patch ms':>16s} {'switch ms':>16s} "
            f"{'infer ms':>16s} "
            f"{'infer/baked':>11s} {'apply/PEFT':>10s} {'patch/recr':>10s} {'switch/PEFT':>11s} "
            f"{'peak dRSS MiB':>13s} {'dRSS/model':>10s} {'cache KiB':>9s}")
    print(head)
    print("-" * len(head))

    def cell(s: dict) -> str:
        return f"{s['median_ms']:8.1f} ({s['min_ms']:6.1f})"

    for mech, row in r["mechanisms"].items():
        d_rss = (row["rss"]["rss_peak"] - row["rss"]["rss_before"]) / 2**20
        ratio_rec = (row["patch"]["median_ms"] / recreate["patch"]["median_ms"]) if recreate else 0
        print(f"{mech:12s} {cell(row['apply']):>16s} {cell(row['patch']):>16s} "
              f"{cell(row['switch']):>16s} "
              f"{cell(row['infer']):>16s} "
              f"{row['infer']['median_ms'] / baked['infer']['median_ms']:11.2f} "
              f"{row['apply']['median_ms'] / peft['load_adapter_merge']['median_ms']:10.2f} "
              f"{ratio_rec:10.2f} "
              f"{row['switch']['median_ms'] / peft['switch']['median_ms']:11.2f} "
              f"{d_rss:13.1f} {d_rss / size_mb:10.2f} {row['cache_bytes'] / 1024:9.1f}")
    print(f"{'PEFT torch':12s} {cell(peft['load_adapter_merge']):>16s} {'':>16s} "
          f"{cell(peft['switch']):>16s} {cell(peft['infer']):>16s}   "
          "(load_adapter+merge_and_unload; unmerge+set_adapter+merge)")
    print(f"{'ORT baked':12s} {'':>16s} {'':>16s} {'':>16s} {cell(baked['infer']):>16s}   "
          f"(plain session, prepacking on; create {baked['create_ms']:.0f} ms)")
    print("apply = verify + decode + patch; patch = stage + health check + commit (what the "
          "mechanism does); ratios use medians")


if __name__ == "__main__":
    main()
