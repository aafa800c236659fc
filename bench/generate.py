"""Generation on the board against torch, on the project's own decoder (one run, ratios).

    python scripts/pretrain_lm.py && python scripts/train_lm_adapters.py
    python bench/generate.py [--lm artifacts/lm] [--new-tokens 64] [--rounds 3] [--out FILE.json]
    python bench/generate.py --random-hidden 1024 [--random-layers 4]   # speed at a larger width

Exports ``<lm>/base`` (cached at ``<lm>/bundle``), makes lossless (float32) signed packets of
the ``docs-all-r16`` and ``email-all-r16`` adapters, then:

* equality: board greedy generation (``lora`` mechanism, the two adapters switched before
  every prompt) against ``PeftModel.merge_and_unload()`` + ``generate`` in torch, token for
  token, on 10 prompts;
* speed, one thread each, KV cache everywhere: decode tokens/s and time to first token of the
  baked merged graph (mechanism ``recreate``: a session whose initializers are the merged
  weights), of the LoRA-slot graph with an adapter active (``lora``: slots as feeds,
  ``lora-native``: an ORT adapter, both on the ``lora-plain`` graph; ``-full``: the same on the
  graph with the DoRA-scale and bias nodes), of in-place merged weights (``initializer``)
  and of torch with PEFT unmerged; adapter switch time; peak RSS of the board process (a child
  that never imports torch). Overheads are the median over rounds of each round's ratio to
  baked (every round runs all mechanisms on one prompt, so load on shared cores hits all alike),
  in wall-clock tokens/s and in CPU time per decode step (the steadier on shared cores).

``--random-hidden N`` measures speed on a random-initialised LLaMA of width ``N`` (head 64,
``N/256`` KV heads, SwiGLU ``2.75 N``, the project's tokenizer) with two random r=16 adapters
on every linear, cached under ``<lm>-random-<N>x<layers>``; greedy equality is still checked.
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
RANDOM_ADAPTERS = ("random-a-r16", "random-b-r16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BAKED = "baked"


def cpu_timed(runtime: Any) -> list[float]:
    """Record the CPU seconds of each graph run of ``runtime`` (this thread's CPU time: ORT on
    one thread runs in the caller, and time spent descheduled on shared cores is not counted)."""
    calls: list[float] = []
    run = runtime.backend.run

    def timed(feeds: Any) -> Any:
        t = time.thread_time()
        out = run(feeds)
        calls.append(time.thread_time() - t)
        return out

    runtime.backend.run = timed
    return calls


def board(bundle: Path, packets: list[Path], key: Path, new_tokens: int,
          rounds: int) -> dict[str, Any]:
    """Child process: no torch. Greedy ids per prompt with switching, and the timings."""
    from solar_edge.format import signing
    from solar_edge.runtime.engine import EdgeRuntime

    trusted = [signing.load_public_key(key)]
    out: dict[str, Any] = {"ids": [], "speed": {}}
    rt = EdgeRuntime(str(bundle), trusted, mechanism="lora", threads=1)  # feeds: switch timing
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
    served = {BAKED: EdgeRuntime(str(bundle), trusted, mechanism="recreate", threads=1),
              "lora": rt}
    for name in ("lora-full", "lora-native", "lora-native-full", "initializer"):
        served[name] = EdgeRuntime(str(bundle), trusted, mechanism=name.removesuffix("-full"),
                                   threads=1)
        if name.endswith("-full"):  # the graph with the DoRA-scale and bias nodes
            served[name].backend.plain_path = None  # type: ignore[attr-defined]
    for runtime in served.values():
        if runtime is not rt:
            runtime.apply(packets[0].read_bytes())
    rt.switch(ids[0])
    runs: dict[str, tuple[list[float], ...]] = {name: ([], [], []) for name in served}
    calls = {name: cpu_timed(runtime) for name, runtime in served.items()}
    for prompt in PROMPTS[:4] * rounds:  # interleaved, so load on shared cores hits all alike
        for name, runtime in served.items():
            calls[name].clear()
            g = runtime.generate(prompt, new_tokens, stop_at_eos=False)
            runs[name][0].append(g.tokens_per_s)
            runs[name][1].append(g.first_token_ms)
            runs[name][2].append(statistics.mean(calls[name][1:]) * 1e3)  # decode steps
    baked, baked_cpu = runs[BAKED][0], runs[BAKED][2]
    for name, (rates, firsts, cpu) in runs.items():
        out["speed"][name] = {
            "tokens_per_s": statistics.median(rates),
            "first_token_ms": statistics.median(firsts),
            "overhead_vs_baked": statistics.median(
                b / r - 1.0 for b, r in zip(baked, rates, strict=True)),
            "cpu_ms_per_step": statistics.median(cpu),
            "cpu_overhead_vs_baked": statistics.median(
                c / b - 1.0 for b, c in zip(baked_cpu, cpu, strict=True))}
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


def random_lm(lm: Path, tokenizer_dir: Path, hidden: int, layers: int) -> None:
    """A random-initialised LLaMA (``<lm>/base``) and two random r=16 adapters on every linear
    (``<lm>/adapters/``), made once."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    base = lm / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        tok = json.loads((tokenizer_dir / "config.json").read_text())
        config = LlamaConfig(vocab_size=tok["vocab_size"], hidden_size=hidden,
                             intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64,
                             num_key_value_heads=max(1, hidden // 256),
                             max_position_embeddings=256, tie_word_embeddings=True,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(config).eval().save_pretrained(str(base))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, base / name)
    for seed, name in enumerate(RANDOM_ADAPTERS, 1):
        if not (lm / "adapters" / name / "adapter_config.json").is_file():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(str(base))
            config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=TARGETS,
                                init_lora_weights=False)
            get_peft_model(model, config).save_pretrained(str(lm / "adapters" / name))


def prepare(lm: Path, adapters: tuple[str, ...]) -> tuple[Path, list[Path], Path]:
    """The bundle (cached; re-exported when it predates the ``lora-plain`` graph) and lossless
    packets of the two adapters, signed by a new key."""
    from solar_edge.exporters.compress import prepare_adapter, sign_packet
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.peft_files import read_adapter

    bundle_dir = lm / "bundle"
    manifest = bundle_dir / "manifest.json"
    if not manifest.is_file() or "lora-plain" not in json.loads(manifest.read_text())["onnx"].get(
            "variants", {}):
        export_bundle(str(lm / "base"), "x86-64", bundle_dir, overwrite=True)
    bundle = load_bundle(bundle_dir)
    key = signing.generate_private_key()
    out = lm / "packets"
    out.mkdir(exist_ok=True)
    signing.save_public_key(key, out / "bench.pub")
    paths = []
    for name in adapters:
        prep = prepare_adapter(read_adapter(lm / "adapters" / name), bundle)
        data = sign_packet(prep, lossless_records(prep), key, name)[0]
        (out / f"{name}.lossless.pkt").write_bytes(data)
        paths.append(out / f"{name}.lossless.pkt")
    return bundle_dir, paths, out / "bench.pub"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", type=Path, default=Path("artifacts/lm"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds of 4 prompts each")
    ap.add_argument("--random-hidden", type=int, default=0, help="a random LLaMA of this width")
    ap.add_argument("--random-layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--board", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.board:  # child: bundle key packets...
        bundle, key, *packets = (Path(p) for p in args.board)
        print(json.dumps(board(bundle, packets, key, args.new_tokens, args.rounds)))
        return
    lm, names = args.lm, ADAPTERS
    if args.random_hidden:
        lm = args.lm.with_name(f"{args.lm.name}-random-{args.random_hidden}x{args.random_layers}")
        names = RANDOM_ADAPTERS
        random_lm(lm, args.lm / "base", args.random_hidden, args.random_layers)
    bundle, packets, key = prepare(lm, names)
    child = subprocess.run([sys.executable, __file__, "--new-tokens", str(args.new_tokens),
                            "--rounds", str(args.rounds),
                            "--board", str(bundle), str(key), *map(str, packets)],
                           check=True, capture_output=True, text=True)
    on_board = json.loads(child.stdout.strip().splitlines()[-1])
    adapters = {n: lm / "adapters" / n for n in names}
    host = torch_side(lm / "base", adapters, args.new_tokens, on_board["ids"])
    speed = {**on_board["speed"], **host["speed"]}
    baked = speed[BAKED]["tokens_per_s"]
    result = {
        "model": json.loads((lm / "base" / "config.json").read_text())["hidden_size"],
        "prompts": len(PROMPTS), "new_tokens": args.new_tokens, "rounds": args.rounds,
        "greedy_equal_prompts": sum(host["equal"]), "greedy_equal": host["equal"],
        "speed": speed,
        **{f"{name.replace('-', '_')}_{kind}_vs_baked": speed[name][f"{kind}_vs_baked"]
           for name in ("lora", "lora-full", "lora-native", "lora-native-full", "initializer")
           for kind in ("overhead", "cpu_overhead")},
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
