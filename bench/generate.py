"""Generation on the board against torch, on the project's own decoder (one run, ratios).

    python scripts/pretrain_lm.py && python scripts/train_lm_adapters.py
    python bench/generate.py [--lm artifacts/lm] [--new-tokens 64] [--out FILE.json]

Exports ``<lm>/base`` (cached at ``<lm>/bundle``), makes lossless (float32) signed packets of
the ``docs-all-r16`` and ``email-all-r16`` adapters, then:

* equality: board greedy generation (``lora`` mechanism, the two adapters switched before
  every prompt) against ``PeftModel.merge_and_unload()`` + ``generate`` in torch, token for
  token, on 10 prompts;
* speed, one thread each, KV cache everywhere: decode tokens/s and time to first token of the
  baked merged graph (mechanism ``recreate``: a session whose initializers are the merged
  weights), of the LoRA-slot graph with an adapter active (``lora``: slots as feeds;
  ``lora-native``: an ORT adapter), of in-place merged weights (``initializer``) and of torch
  with PEFT unmerged; adapter switch time; peak RSS of the board process (a child that never imports
  torch).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "def parse_args(argv):",
    "import os\nimport sys\n\n",
    "class Message:\n    def __init__(self",
    "    for line in lines:\n",
    "from email.mime.text import",
    "The with statement is used to",
    "A function definition defines",
    "Integers and floating point numbers",
    "The import system",
    "Exceptions are raised when",
]
ADAPTERS = ("docs-all-r16", "email-all-r16")


def board(bundle: Path, packets: list[Path], key: Path, new_tokens: int) -> dict[str, Any]:
    """Child process: no torch. Greedy ids per prompt with switching, and the timings."""
    from solar_edge.format import signing
    from solar_edge.runtime.engine import EdgeRuntime

    trusted = [signing.load_public_key(key)]
    out: dict[str, Any] = {"ids": [], "speed": {}}
    rt = EdgeRuntime(str(bundle), trusted, mechanism="lora", threads=1)
    ids = [rt.stage(p.read_bytes()).adapter_id for p in packets]
    for i, prompt in enumerate(PROMPTS):
        rt.activate(ids[i % len(ids)])
        out["ids"].append(rt.generate(prompt, new_tokens).ids)
    switches = []
    for i in range(40):
        t = time.perf_counter()
        rt.switch(ids[i % 2])
        switches.append((time.perf_counter() - t) * 1e3)
    out["switch_ms_median"] = statistics.median(switches)
    served = {"baked": EdgeRuntime(str(bundle), trusted, mechanism="recreate", threads=1),
              "lora": rt}
    for name in ("lora-native", "initializer"):
        served[name] = EdgeRuntime(str(bundle), trusted, mechanism=name, threads=1)
    for runtime in served.values():
        if runtime is not rt:
            runtime.apply(packets[0].read_bytes())
    rt.switch(ids[0])
    runs: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in served}
    for prompt in PROMPTS[:4] * 3:  # interleaved, so load on shared cores hits all alike
        for name, runtime in served.items():
            g = runtime.generate(prompt, new_tokens, stop_at_eos=False)
            runs[name][0].append(g.tokens_per_s)
            runs[name][1].append(g.first_token_ms)
    for name, (rates, firsts) in runs.items():
        out["speed"][name] = {"tokens_per_s": statistics.median(rates),
                              "first_token_ms": statistics.median(firsts)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def torch_side(base: Path, adapters: dict[str, Path], new_tokens: int,
               board_ids: list[list[int]]) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    names = list(adapters)
    equal = []
    for i, prompt in enumerate(PROMPTS):
        model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
        merged = PeftModel.from_pretrained(model, str(adapters[names[i % 2]])).merge_and_unload()
        x = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            want = merged.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=new_tokens, pad_token_id=0)[0, x.shape[1]:]
        equal.append([int(t) for t in want] == board_ids[i])
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]])).eval()
    rates, firsts = [], []
    for prompt in PROMPTS[:4] * 2:
        x = torch.tensor([tok.encode(prompt).ids])
        times = []
        for n in (1, new_tokens):
            t = time.perf_counter()
            with torch.no_grad():
                peft.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                              use_cache=True)
            times.append(time.perf_counter() - t)
        firsts.append(times[0] * 1e3)
        rates.append((new_tokens - 1) / max(times[1] - times[0], 1e-9))
    return {"equal": equal, "speed": {"torch_peft_unmerged": {
        "tokens_per_s": statistics.median(rates), "first_token_ms": statistics.median(firsts)}}}


def prepare(lm: Path) -> tuple[Path, list[Path], Path]:
    """The bundle (cached) and lossless packets of the two adapters, signed by a new key."""
    from solar_edge.exporters.compress import prepare_adapter, sign_packet
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.peft_files import read_adapter

    bundle_dir = lm / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        export_bundle(str(lm / "base"), "x86-64", bundle_dir)
    bundle = load_bundle(bundle_dir)
    key = signing.generate_private_key()
    out = lm / "packets"
    out.mkdir(exist_ok=True)
    signing.save_public_key(key, out / "bench.pub")
    paths = []
    for name in ADAPTERS:
        prep = prepare_adapter(read_adapter(lm / "adapters" / name), bundle)
        data = sign_packet(prep, lossless_records(prep), key, name)[0]
        (out / f"{name}.lossless.pkt").write_bytes(data)
        paths.append(out / f"{name}.lossless.pkt")
    return bundle_dir, paths, out / "bench.pub"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", type=Path, default=Path("artifacts/lm"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--board", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.board:  # child: bundle key packets...
        bundle, key, *packets = (Path(p) for p in args.board)
        print(json.dumps(board(bundle, packets, key, args.new_tokens)))
        return
    bundle, packets, key = prepare(args.lm)
    child = subprocess.run([sys.executable, __file__, "--new-tokens", str(args.new_tokens),
                            "--board", str(bundle), str(key), *map(str, packets)],
                           check=True, capture_output=True, text=True)
    on_board = json.loads(child.stdout.strip().splitlines()[-1])
    adapters = {n: args.lm / "adapters" / n for n in ADAPTERS}
    host = torch_side(args.lm / "base", adapters, args.new_tokens, on_board["ids"])
    speed = {**on_board["speed"], **host["speed"]}
    baked = speed["baked"]["tokens_per_s"]
    result = {
        "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
        "greedy_equal_prompts": sum(host["equal"]), "greedy_equal": host["equal"],
        "speed": speed,
        "lora_overhead_vs_baked": baked / speed["lora"]["tokens_per_s"] - 1.0,
        "lora_native_overhead_vs_baked": baked / speed["lora-native"]["tokens_per_s"] - 1.0,
        "initializer_overhead_vs_baked": baked / speed["initializer"]["tokens_per_s"] - 1.0,
        "torch_peft_vs_baked": baked / speed["torch_peft_unmerged"]["tokens_per_s"],
        "switch_ms_median": on_board["switch_ms_median"],
        "board_peak_rss_mb": on_board["peak_rss_mb"],
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
