"""Rate-distortion of the decoder adapters, served as the board serves them.

    python bench/decoder_rd.py [--lm artifacts/lm] [--adapters email-all-r16 docs-all-r16]
        [--out artifacts/lm/rd.json]

For each adapter: real signed packets (everything counted: header, metadata, signature) of
the uncompressed adapter (float32), the plain baselines (the adapter's own factors at
float16 and int8..int2, group 64), the data-free codec and the calibrated codec (``--metric
act`` on lines of the domain's training text), with and without the refit (120 steps, KL of
next-token distributions), on budget ladders. Each packet is applied to a real
``EdgeRuntime`` (mechanism ``lora``) and measured on every held-out window of the adapter's
domain: perplexity, and next-token top-1 agreement with the uncompressed adapter.

Windows alternate between validation (even) and test (odd). Per method, the smallest packet
within 1 % of the uncompressed adapter's perplexity is chosen on validation and reported on
test, with its ratio to the plain baseline chosen the same way. Points are cached in
``<out>.cache.json`` (adapter file hash, bundle, method, budget); the table is printed and
written beside the JSON as ``.md``, the curves as ``.png``.
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

BUDGETS = (6000, 12000, 24000, 32000, 48000, 64000, 72000, 80000, 96000, 128000)
CAL_BUDGETS = (24000, 48000, 64000, 72000, 80000, 96000)
REFIT_BUDGETS = (24000, 48000, 96000)  # the refit is the slow part (minutes a point)
METHODS = ("plain", "data-free", "calibrated", "calibrated+refit")
TARGET = 1.01  # within 1 % of the uncompressed adapter's perplexity
GOAL = 1 / 3


def served(rt: Any, data: bytes, wins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the summed next-token NLL of the served packet, and its argmax tokens."""
    info = rt.stage(data)
    rt.activate(info.adapter_id)
    nll, tops = [], []
    for w in wins:
        logits = rt.run_graph(rt.family.step_feeds(w[None], 0, None))[0][0, :-1]
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll.append(-float(logp[np.arange(len(w) - 1), w[1:]].sum()))
        tops.append(logits.argmax(-1))
    return np.asarray(nll), np.stack(tops)


def split_scores(nll: np.ndarray, tops: np.ndarray, ref: np.ndarray | None,
                 tokens: int) -> dict[str, float]:
    """Perplexity and top-1 agreement on the validation (even) and test (odd) windows."""
    out = {}
    for name, sel in (("val", slice(0, None, 2)), ("test", slice(1, None, 2))):
        out[f"{name}_ppl"] = round(math.exp(nll[sel].sum() / (len(nll[sel]) * tokens)), 3)
        out[f"{name}_top1"] = (1.0 if ref is None else
                               round(float((tops[sel] == ref[sel]).mean()), 4))
    return out


def chosen(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method the smallest packet within :data:`TARGET` on validation, its test scores,
    and its ratio to the plain baseline chosen the same way."""
    ref = rows[0]
    best: dict[str, Any] = {}
    for method in METHODS:
        ok = [r for r in rows if r["method"] == method
              and r["val_ppl"] <= ref["val_ppl"] * TARGET]
        r = min(ok, key=lambda r: r["bytes"]) if ok else None
        best[method] = r and {**r, "test_within": r["test_ppl"] <= ref["test_ppl"] * TARGET}
    plain = best["plain"]
    ratio = {m: (round(best[m]["bytes"] / plain["bytes"], 3) if best[m] and plain else None)
             for m in METHODS[1:]}
    return {"smallest_within_1pct": best, "ratio_to_plain": ratio,
            "goal_met": {m: (r is not None and r <= GOAL) for m, r in ratio.items()}}


def one_adapter(lm: Path, bundle: Any, tok: Any, key: Any, name: str,
                cache: dict[str, Any], save: Any) -> dict[str, Any]:
    """Every point of one adapter (cached), and the chosen packets (module docstring)."""
    import lm_data
    from pretrain_lm import token_stream, windows
    from rd_packets import file_hash, lora_int_records

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
    wins = windows(token_stream(tok, lm_data.texts(f"{domain}-heldout")), 1 << 16)
    calib = lm / f"calib-{domain}.txt"
    lines = [ln.strip() for d in lm_data.texts(f"{domain}-train") for ln in d.splitlines()
             if len(ln.strip()) > 30]
    calib.write_text("\n".join(lines[:: max(1, len(lines) // 256)][:256]) + "\n")
    adapter_dir = lm / "adapters" / name
    prep = prepare_adapter(read_adapter(adapter_dir), bundle)
    rt = EdgeRuntime(str(bundle.root), [key.public_key()], mechanism="lora", threads=1)
    tag = f"{name}|{file_hash(adapter_dir / 'adapter_model.safetensors')}|" \
          f"{bundle.fingerprint.hex()[:12]}|windows={len(wins)}"
    version = iter(range(1, 1 << 20))
    rows: list[dict[str, Any]] = []
    ref_tops: list[np.ndarray] = []

    def point(method: str, label: str, build: Any) -> None:
        key_ = f"{tag}|{method}|{label}"
        if key_ not in cache:
            data = build()
            nll, tops = served(rt, data, wins)
            row = {"method": method, "point": label, "bytes": len(data),
                   **split_scores(nll, tops, ref_tops[0] if method != "uncompressed" else None,
                                  wins.shape[1] - 1),
                   "tops": tops.tolist() if method == "uncompressed" else None}
            cache[key_] = row
            save()
        row = cache[key_]
        if method == "uncompressed":  # measured first: the others' top-1 reference
            ref_tops.append(np.asarray(row["tops"]))
        rows.append({k: v for k, v in row.items() if k != "tops"})
        print(name, rows[-1], flush=True)

    def signed(records: list) -> bytes:
        return sign_packet(prep, records, key, name, next(version))[0]

    def compressed(**options: Any) -> Any:
        return lambda: compress_adapter(adapter_dir, bundle, key, CompressOptions(**options),
                                        adapter_id=name, version=next(version)).data

    point("uncompressed", "float32", lambda: signed(lossless_records(prep)))
    for fmt in (ValueFormat.FLOAT16, ValueFormat.INT8, ValueFormat.INT4, ValueFormat.INT3,
                ValueFormat.INT2):
        point("plain", fmt.name.lower(),
              lambda fmt=fmt: signed(lora_int_records(prep.updates, fmt)))
    calibrated = {"metric": "act", "calib_data": calib, "model_dir": lm / "base"}
    for budget in BUDGETS:
        point("data-free", str(budget), compressed(budget=budget))
    for budget in CAL_BUDGETS:
        point("calibrated", str(budget), compressed(budget=budget, **calibrated))
    for budget in REFIT_BUDGETS:
        point("calibrated+refit", str(budget),
              compressed(budget=budget, refit_steps=120, **calibrated))
    out = {"windows": {"val": len(wins[0::2]), "test": len(wins[1::2]),
                       "tokens": int(wins.shape[1])}, "rows": rows, **chosen(rows)}
    print(name, json.dumps(out["ratio_to_plain"]), flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The chosen packets per adapter and method (validation chooses, test reports)."""
    lines = ["| adapter | method | chosen on validation | bytes | val ppl | test ppl "
             "(uncompressed) | test top-1 | within 1 % on test | / plain (goal <= 1/3) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in result.items():
        ref = r["rows"][0]
        for m in METHODS:
            c = r["smallest_within_1pct"][m]
            ratio = r["ratio_to_plain"].get(m)
            if c is None:
                lines.append(f"| {name} | {m} | none | | | | | | |")
                continue
            lines.append(f"| {name} | {m} | {c['point']} | {c['bytes']} | {c['val_ppl']:.2f} | "
                         f"{c['test_ppl']:.2f} ({ref['test_ppl']:.2f}) | {c['test_top1']:.3f} | "
                         f"{'yes' if c['test_within'] else 'no'} | "
                         f"{'-' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Test perplexity against bytes per adapter, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rd_report import save_panels, style_panel

    fig, axes = plt.subplots(1, max(2, len(result)), figsize=(6 * max(2, len(result)), 4),
                             squeeze=False)
    for ax, (name, r) in zip(axes.flat, result.items(), strict=False):
        ref = r["rows"][0]
        for m in METHODS:
            pts = sorted((x["bytes"], x["test_ppl"]) for x in r["rows"] if x["method"] == m)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=m)
        ax.axhline(ref["test_ppl"] * TARGET, color="k", ls=":", lw=1, label="uncompressed +1 %")
        style_panel(ax, name, "test perplexity")
    save_panels(fig, axes, len(result), path)
    plt.close(fig)


def main() -> None:
    from tokenizers import Tokenizer

    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", type=Path, default=Path("artifacts/lm"))
    ap.add_argument("--adapters", nargs="+", default=["email-all-r16", "docs-all-r16"])
    ap.add_argument("--out", type=Path, default=Path("artifacts/lm/rd.json"))
    args = ap.parse_args()
    bundle = load_bundle(args.lm / "bundle")
    tok = Tokenizer.from_file(str(args.lm / "base" / "tokenizer.json"))
    key = signing.generate_private_key()
    cache_path = args.out.with_suffix(".cache.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def save() -> None:
        cache_path.write_text(json.dumps(cache))

    result = {name: one_adapter(args.lm, bundle, tok, key, name, cache, save)
              for name in args.adapters}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    plot(result, args.out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
