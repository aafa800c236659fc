"""Rate-distortion of the decoder adapters, served as the board serves them.

    python bench/decoder_rd.py [--lm artifacts/lm] [--adapters email-all-r16 docs-all-r16]

For each adapter: real signed packets (everything counted: header, metadata, signature) of
the uncompressed adapter (float32), the plain baselines (the adapter's own factors at
float16 and int8..int2, group 64), the data-free codec and the calibrated codec (``--metric
act`` on lines of the domain's training text), with and without the refit (120 steps, KL of
next-token distributions), at several budgets. Each packet is applied to a real
``EdgeRuntime`` (mechanism ``lora``) and measured on the domain's held-out windows:
perplexity, and next-token top-1 agreement with the uncompressed adapter. Reported: the
smallest packet within 1 % of the uncompressed adapter's perplexity per method, and its
ratio to the best plain baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

BUDGETS = (6000, 12000, 24000, 48000, 96000)
CAL_BUDGETS = (24000, 48000, 96000)
REFIT_BUDGETS = (24000, 48000, 96000)
WINDOWS = 40


def served(rt: Any, data: bytes, wins: np.ndarray) -> tuple[float, np.ndarray]:
    """Perplexity of the served packet on ``wins`` and its argmax next tokens."""
    info = rt.stage(data)
    rt.activate(info.adapter_id)
    nll, count, tops = 0.0, 0, []
    for w in wins:
        logits = rt.run_graph(rt.family.step_feeds(w[None], 0, None))[0][0, :-1]
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
        tops.append(logits.argmax(-1))
    return math.exp(nll / count), np.concatenate(tops)


def one_adapter(lm: Path, bundle: Any, tok: Any, key: Any, name: str) -> dict[str, Any]:
    """Every point of one adapter, and the smallest packets within 1 % (module docstring)."""
    import lm_data
    from pretrain_lm import token_stream, windows
    from rd_packets import lora_int_records

    from solar_edge.exporters.compress import (
        CompressOptions,
        compress_adapter,
        prepare_adapter,
        sign_packet,
    )
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.format.records import ValueFormat
    from solar_edge.methods.peft_files import read_adapter
    from solar_edge.runtime.engine import EdgeRuntime

    domain = name.split("-")[0]
    wins = windows(token_stream(tok, lm_data.texts(f"{domain}-heldout")), WINDOWS)
    calib = lm / f"calib-{domain}.txt"
    lines = [ln.strip() for d in lm_data.texts(f"{domain}-train") for ln in d.splitlines()
             if len(ln.strip()) > 30]
    calib.write_text("\n".join(lines[:: max(1, len(lines) // 256)][:256]) + "\n")
    adapter_dir = lm / "adapters" / name
    prep = prepare_adapter(read_adapter(adapter_dir), bundle)
    rt = EdgeRuntime(str(bundle.root), [key.public_key()], mechanism="lora", threads=1)
    version = iter(range(1, 1000))
    rows: list[dict[str, Any]] = []

    def measure(method: str, label: str, data: bytes, ref_top: np.ndarray | None) -> Any:
        ppl, top = served(rt, data, wins)
        agree = float((top == ref_top).mean()) if ref_top is not None else 1.0
        rows.append({"method": method, "point": label, "bytes": len(data),
                     "ppl": round(ppl, 3), "top1_agreement": round(agree, 4)})
        print(name, rows[-1], flush=True)
        return top

    data = sign_packet(prep, lossless_records(prep), key, name, next(version))[0]
    ref = measure("uncompressed", "float32", data, None)
    for fmt in (ValueFormat.FLOAT16, ValueFormat.INT8, ValueFormat.INT4, ValueFormat.INT3,
                ValueFormat.INT2):
        records = lora_int_records(prep.updates, fmt)
        data = sign_packet(prep, records, key, name, next(version))[0]
        measure("plain", fmt.name.lower(), data, ref)
    for budget in BUDGETS:
        c = compress_adapter(adapter_dir, bundle, key, CompressOptions(budget=budget),
                             adapter_id=name, version=next(version))
        measure("data-free", str(budget), c.data, ref)
    for budget in CAL_BUDGETS:
        c = compress_adapter(adapter_dir, bundle, key, CompressOptions(
            budget=budget, metric="act", calib_data=calib, model_dir=lm / "base"),
            adapter_id=name, version=next(version))
        measure("calibrated", str(budget), c.data, ref)
    for budget in REFIT_BUDGETS:
        c = compress_adapter(adapter_dir, bundle, key, CompressOptions(
            budget=budget, metric="act", calib_data=calib, model_dir=lm / "base",
            refit_steps=120), adapter_id=name, version=next(version))
        measure("calibrated+refit", str(budget), c.data, ref)
    target = rows[0]["ppl"] * 1.01
    best = {}
    for method in ("plain", "data-free", "calibrated", "calibrated+refit"):
        ok = [r["bytes"] for r in rows if r["method"] == method and r["ppl"] <= target]
        best[method] = min(ok) if ok else None
    out = {"rows": rows, "smallest_within_1pct": best, "ratio_to_plain": {
        m: (round(best[m] / best["plain"], 3) if best[m] and best["plain"] else None)
        for m in ("data-free", "calibrated", "calibrated+refit")}}
    print(name, json.dumps(out["smallest_within_1pct"]), json.dumps(out["ratio_to_plain"]),
          flush=True)
    return out


def main() -> None:
    from tokenizers import Tokenizer

    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", type=Path, default=Path("artifacts/lm"))
    ap.add_argument("--adapters", nargs="+", default=["email-all-r16", "docs-all-r16"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bundle = load_bundle(args.lm / "bundle")
    tok = Tokenizer.from_file(str(args.lm / "base" / "tokenizer.json"))
    key = signing.generate_private_key()
    result: dict[str, Any] = {}
    for name in args.adapters:
        result[name] = one_adapter(args.lm, bundle, tok, key, name)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
