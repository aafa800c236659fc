"""Apply cost on real MiniLM: every ORT mechanism against PEFT and session re-creation.

    python bench/runtime.py --bundle BUNDLE_DIR [--out runtime-bench.json] [--threads 1]

One run measures, for every ORT mechanism (``initializer``, ``iobinding``, ``lora``,
``lora-native``, ``recreate``): apply latency (verify + decode + stage + the checks the
packet asks for + commit, a new version each time) of a small (``--small-budget``, ~4 KB)
and a large packet (factored cores, k <= 8, ~73 KB) of the same PEFT adapter, both with an
update digest as ``compress`` signs by default, and of the large one with an output canary
(``--canary outputs``: a forward pass on the canary inputs) and with no vouch (a forward
pass on the health input); switch latency between two
cached adapters; inference latency of the graph it serves vs the baked graph; peak RSS
during apply (a fresh subprocess per mechanism, RSS sampled every millisecond). Baselines
in the same run: PEFT ``from_pretrained`` + ``merge_and_unload`` in torch on that adapter,
PEFT switch (unmerge, set_adapter, merge), and creating a plain ORT session. Then apply
(and its decode step) against the coefficients a packet keeps, on the default mechanism,
for sparse cores and factored cores of a few sizes. Adapters are real PEFT LoRA r=8 on
query/value (random-initialised, saved by PEFT). Medians over ``--repeat`` runs; a shared
machine is noisy, so the minimum is printed too. Ratios are medians of this one run; the
applies and PEFT's load + merge are timed in the same rounds (one of each per round), so a
burst of load on a shared machine hits both sides of a ratio alike (table:
``runtime_report.py``).
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
import warnings
from collections.abc import Callable
from pathlib import Path

from runtime_report import print_table

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


def make_packets(bundle_dir: Path, adapters: list[Path], key, versions: int,
                 prefix: str = "task", vouch: str = "update", **codec) -> list[list[bytes]]:
    """Per adapter, ``versions`` signed packets (versions 1..n) of one encoding (``codec``:
    :class:`CodecConfig` fields); a new version per apply makes every apply a full one.
    ``vouch`` is what the metadata vouches for, as ``compress --canary`` writes it:
    ``update`` (its default), ``outputs`` or ``none``."""
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
        res = encode(ups, {lid: bundle.layer_basis(lid) for lid in ups},
                     CodecConfig(seed=i, **codec))

        def signed(v: int, meta: dict, aid: str = f"{prefix}{i}", res=res) -> bytes:
            return encode_packet(PacketHeader(bundle.fingerprint, aid, v, meta), res.header,
                                 res.records, key)

        meta = vouched({"task": str(i)}, bundle_dir, key, signed(1, {"task": str(i)}), vouch)
        out.append([signed(v, meta) for v in range(1, versions + 1)])
    return out


def vouched(meta: dict, bundle_dir: Path, key, packet: bytes, vouch: str) -> dict:
    """``meta`` with the vouch ``compress`` would sign for ``packet`` (computed by a board
    that serves it, as compress computes it)."""
    from solar_edge.regen import canary, update_digest
    from solar_edge.runtime.engine import EdgeRuntime

    if vouch == "none":
        return meta
    rt = EdgeRuntime(str(bundle_dir), [key.public_key()])
    info = rt.apply(packet)
    if vouch == "update":
        return {**meta, "update_digest": {"digest": rt.update_digest(info.adapter_id),
                                          "tolerance": update_digest.DEFAULT_TOLERANCE}}
    inputs = rt.bundle.bundle.manifest["canary"]["inputs"]
    return {**meta, "canary": {"digest": canary.digest(rt.infer(inputs)),
                               "tolerance": canary.DEFAULT_TOLERANCE}}


def own_packets(path: Path, src_bundle: Path, bundle_dir: Path, key, versions: int,
                prefix: str) -> list[list[bytes]]:
    """A packet ``solar-edge compress`` made for ``src_bundle``, re-signed with ``key`` as
    ``versions`` new versions for the bench's copy of that bundle (``prepare_bundle``: graph
    variants added, weights and bases unchanged), its metadata and records as they are."""
    from dataclasses import replace

    from solar_edge.format.bundle import load_bundle
    from solar_edge.format.reader import decode_packet
    from solar_edge.format.writer import encode_packet

    packet = decode_packet(path.read_bytes())
    if packet.header.fingerprint != load_bundle(src_bundle).fingerprint:
        raise SystemExit(f"{path}: made for another bundle than {src_bundle}")
    fingerprint = load_bundle(bundle_dir).fingerprint
    return [[encode_packet(replace(packet.header, fingerprint=fingerprint, adapter_id=prefix,
                                   adapter_version=v), packet.codec, packet.records, key)
             for v in range(1, versions + 1)]]


def kept_coefficients(packet: bytes) -> int:
    """Values a packet carries over all its records (what the decoder multiplies)."""
    from solar_edge.format.reader import decode_packet

    return sum(r.values.count for r in decode_packet(packet).records)


# --- measurements -----------------------------------------------------------------------------

def apply_all(rt, packets: list[list[bytes]], repeat: int) -> tuple[list[float], list[dict]]:
    """``repeat`` applies, alternating adapters, each a new version: full verify + decode +
    stage + probe + commit every time."""
    ms, steps = [], []
    for v in range(repeat):
        ms.append(apply_once(rt, packets, v))
        steps.append(rt.last_timings)
    return ms, steps


def apply_once(rt, packets: list[list[bytes]], v: int) -> float:
    """Apply number ``v`` of a sequence (adapters alternate, versions rise), in ms."""
    t = time.perf_counter()
    rt.apply(packets[v % len(packets)][v // len(packets)])
    return (time.perf_counter() - t) * 1e3


def bench_applies(bundle_dir: Path, mechs: list[str], sizes: dict[str, list[list[bytes]]],
                  key, repeat: int, threads: int, peft_apply: Callable[..., float],
                  own_adapters: dict[str, Path] | None = None
                  ) -> tuple[dict, list[float], dict[str, list[float]],
                             dict[str, Callable[[], object]]]:
    """Apply of each packet size on every mechanism and PEFT's load + merge, interleaved:
    each round times one PEFT load + merge (and one of each ``own_adapters`` entry, the
    adapter an ``--own`` packet was made from), then one apply per mechanism and size, so
    load on a shared machine hits them alike and ratios compare the same rounds. Then
    switch between the two large adapters, per mechanism."""
    from solar_edge.runtime.engine import EdgeRuntime

    rows: dict[str, dict] = {}
    rts = {}
    for mech in mechs:
        t = time.perf_counter()
        rts[mech] = EdgeRuntime(str(bundle_dir), [key.public_key()], mechanism=mech,
                                threads=threads, max_cached=16)
        rows[mech] = {"load_ms": round((time.perf_counter() - t) * 1e3, 1)}
    ms: dict[tuple[str, str], list[float]] = {(m, s): [] for m in mechs for s in sizes}
    steps: dict[tuple[str, str], list[dict]] = {(m, s): [] for m in mechs for s in sizes}
    cache: dict[tuple[str, str], int] = {}
    peft_ms = []
    own_adapters = own_adapters or {}
    own_peft_ms: dict[str, list[float]] = {size: [] for size in own_adapters}
    for adapter in own_adapters.values():
        peft_apply(adapter)  # first call for this adapter: not timed
    for v in range(repeat):
        peft_ms.append(peft_apply())
        for size, adapter in own_adapters.items():
            own_peft_ms[size].append(peft_apply(adapter))
        for mech, rt in rts.items():
            for size, packets in sizes.items():
                ms[mech, size].append(apply_once(rt, packets, v))
                steps[mech, size].append(rt.last_timings)
                cache[mech, size] = rt.active.cache_bytes
    runners: dict[str, Callable[[], object]] = {}
    for mech, rt in rts.items():
        row = rows[mech]
        for size in sizes:
            st = steps[mech, size]
            patch = [s["stage_ms"] + s["probe_ms"] + s["commit_ms"] for s in st]
            row[size] = {"apply": summary(ms[mech, size]), "patch": summary(patch),
                         "steps_median_ms": {k: round(statistics.median(s[k] for s in st), 2)
                                             for k in st[0]},
                         "cache_bytes": cache[mech, size]}
        switch_ms = []
        for i in range(repeat):
            t = time.perf_counter()
            rt.switch(f"task{i % 2}")
            switch_ms.append((time.perf_counter() - t) * 1e3)
        row["switch"] = summary(switch_ms)
        feeds = rt.family.feeds(SENTENCES)
        runners[mech] = (lambda rt=rt, feeds=feeds: rt.backend.run(feeds))
    return rows, peft_ms, own_peft_ms, runners


SWEEP = [("sparse_core", {"budget_bytes": b}) for b in (1024, 4096, 16384, 65536)] + \
        [("factored_core", {"max_rank": k}) for k in (1, 2, 4, 8)]


def bench_sweep(bundle_dir: Path, adapter: Path, key, repeat: int, threads: int) -> list[dict]:
    """Apply and decode time against the coefficients a packet keeps (default mechanism)."""
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(bundle_dir), [key.public_key()], threads=threads, max_cached=2)
    rows = []
    for n, (rep, codec) in enumerate(SWEEP):
        packets = make_packets(bundle_dir, [adapter], key, repeat, prefix=f"sweep{n}-",
                               representation=rep, **codec)
        apply_ms, steps = apply_all(rt, packets, repeat)
        rows.append({"representation": rep, **codec, "packet_bytes": len(packets[0][0]),
                     "kept": kept_coefficients(packets[0][0]), "mechanism": rt.mechanism,
                     "apply": summary(apply_ms),
                     "decode": summary([s["decode_ms"] for s in steps])})
    return rows


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


def bench_peft(adapters: list[Path], repeat: int, threads: int
               ) -> tuple[dict, Callable[[], object], Callable[..., float]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from solar_edge.exporters.train import minilm_path

    torch.set_num_threads(threads or torch.get_num_threads())
    base = AutoModel.from_pretrained(minilm_path()).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(SENTENCES, padding=True, return_tensors="pt")

    def load_merge(adapter: Path = adapters[0]) -> float:
        """One PEFT load_adapter + merge_and_unload on a fresh copy of the base, in ms."""
        fresh = copy.deepcopy(base)
        t = time.perf_counter()
        PeftModel.from_pretrained(fresh, str(adapter)).merge_and_unload()
        return (time.perf_counter() - t) * 1e3

    load_merge()  # first call: imports and caches, not timed
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

    return {"switch": summary(switch)}, infer, load_merge


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
    ap.add_argument("--small-budget", type=int, default=4096, help="small packet, bytes")
    ap.add_argument("--own", action="append", default=[], metavar="PACKET[=ADAPTER_DIR]",
                    help="a packet `solar-edge compress` made for --bundle, applied in the same "
                         "rounds; with =ADAPTER_DIR (the PEFT adapter it was made from) PEFT's "
                         "load + merge of that adapter is timed in the same rounds too; "
                         "repeatable")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--packet", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pub", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(str(args.bundle), args.rss_child, args.packet, args.pub)
        return

    from transformers.utils import logging as hf_logging

    from solar_edge.format import signing

    hf_logging.disable_progress_bar()   # the table is the output: no library chatter
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    mechs = args.mechanisms.split(",")
    with tempfile.TemporaryDirectory(prefix="solar-edge-bench-") as tmp:
        work = Path(tmp)
        bundle_dir = prepare_bundle(args.bundle, work)
        key = signing.generate_private_key()
        pub = signing.save_public_key(key, work / "bench.pub")
        adapters = make_peft_adapters(work)
        n = args.repeat // 2 + 2
        large = {"representation": "factored_core", "max_rank": 8}  # LoRA-like k, INT8
        sizes = {"large": make_packets(bundle_dir, adapters, key, n, **large),
                 "small": make_packets(bundle_dir, adapters, key, n, prefix="small",
                                       budget_bytes=args.small_budget),
                 # the same large packet with the other vouches compress can sign
                 "large-outputs": make_packets(bundle_dir, adapters, key, n, prefix="out",
                                               vouch="outputs", **large),
                 "large-none": make_packets(bundle_dir, adapters, key, n, prefix="none",
                                            vouch="none", **large)}
        own_adapters: dict[str, Path] = {}
        for j, spec in enumerate(args.own):
            path, _, adapter = spec.partition("=")
            size = f"own:{Path(path).name}"
            sizes[size] = own_packets(Path(path), args.bundle, bundle_dir, key,
                                      args.repeat + 1, f"own{j}")
            if adapter:
                own_adapters[size] = Path(adapter)
        baked, run_baked = bench_baked(bundle_dir, args.repeat, args.threads)
        peft, run_peft, peft_apply = bench_peft(adapters, args.repeat, args.threads)
        results: dict = {"packets": {k: {"bytes": len(v[0][0]), "kept": kept_coefficients(v[0][0])}
                                     for k, v in sizes.items()},
                         "threads": args.threads, "repeat": args.repeat,
                         "sizes": model_sizes(bundle_dir), "baked": baked, "peft": peft,
                         "mechanisms": {}}
        rows, peft_ms, own_peft_ms, mech_runners = bench_applies(
            bundle_dir, mechs, sizes, key, args.repeat, args.threads, peft_apply, own_adapters)
        peft["load_adapter_merge"] = summary(peft_ms)
        peft["own"] = {size: summary(ms) for size, ms in own_peft_ms.items()}
        runners = {"baked": run_baked, "peft": run_peft, **mech_runners}
        for mech in mechs:
            rows[mech]["rss"] = bench_rss(bundle_dir, mech, sizes["large"][0][0], pub, work)
            results["mechanisms"][mech] = rows[mech]
        results["sweep"] = bench_sweep(bundle_dir, adapters[0], key, args.repeat, args.threads)
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


if __name__ == "__main__":
    main()
