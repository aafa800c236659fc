"""Does SOLAR's seeded perturbation (epsilon > 0) earn its bytes? Served accuracy, one run.

    nice -n 10 python bench/perturb.py --bundle /tmp/rd-bundle \
        --adapters artifacts/seqcls --only pydoc-topics/seqcls-lora-qv-r8 \
        --budgets 4096,8192,16384 --eps 0.005,0.05,0.2 --out out/perturb/perturb.json

For each standard PEFT classifier (``rd_served.seqcls_dirs``) and each whole-packet byte
budget, packets of ``solar_edge.encode.solar.encode`` (int3/int4/int8 chosen per layer) with
``epsilon = 0`` and with ``epsilon in --eps``, where the encoder searches ``--variants`` PRNG
variants per layer (``CodecConfig.variants``: each layer keeps the variant of least
reconstruction error; the packet's seed stays 0, as ``sign_packet`` writes it). Two
representations: ``auto`` (the codec's choice per layer: sparse core, factored core or dense
factors) and ``factored_core`` (always a core in the perturbed basis, so epsilon cannot be
sidestepped by dense factors). Per budget the best epsilon > 0 setting is chosen on the
validation split (``selected``) and reported on the report split, never used to choose.
Beside them, ``solar-edge compress``'s data-free packet at the same budget (``data-free``).

``--lm DIR`` does the same for decoder adapters (``--lm-adapters``, under ``DIR/adapters``;
``DIR/bundle``), served as ``decoder_rd.py`` serves them (real ``EdgeRuntime``, mechanism
``lora``): perplexity on held-out windows, even windows for validation (the choice among
epsilon > 0), odd windows for the report, and top-1 agreement with the float32 packet.

Everything is served as a board serves it (``rd_served.ServedBench``: signed packet, real
runtime, the packet's own head); bytes are ``len`` of the signed packet; splits are
``rd_served.task_splits``'s. Agreement: report predictions equal to the lossless packet's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rd_served  # noqa: E402

from solar_edge.encode.solar import CodecConfig, encode  # noqa: E402
from solar_edge.exporters.compress import CompressOptions  # noqa: E402
from solar_edge.format.bundle import load_bundle  # noqa: E402
from solar_edge.format.records import ValueFormat  # noqa: E402
from solar_edge.methods.peft_files import read_adapter  # noqa: E402

FORMATS = (ValueFormat.INT3, ValueFormat.INT4, ValueFormat.INT8)
REPRESENTATIONS = ("auto", "factored_core")


def codec_points(b: rd_served.ServedBench, budget: int, eps_list: list[float],
                 variants: int) -> list[dict]:
    """The codec at ``budget`` bytes (whole packet), epsilon 0 and each epsilon > 0."""
    updates, extras = b.prep.updates, b.prep.extras.records
    bases = {lid: b.bundle.layer_basis(lid) for lid in updates}
    overhead = len(b.sign(list(extras))) + 64  # header, metadata, extras, signature, margin
    rows = []
    for rep in REPRESENTATIONS:
        for eps in [0.0, *eps_list]:
            n_var = 1 if eps == 0 else variants
            cfg = CodecConfig(epsilon=eps, variants=n_var, value_format=FORMATS,
                              representation=rep, budget_bytes=budget, overhead_bytes=overhead)

            def build(cfg: CodecConfig = cfg) -> tuple[bytes, dict]:
                res = encode(updates, bases, cfg)
                kinds = [r.kind.name for r in res.records]
                return b.sign(res.records + list(extras)), {
                    "budget": budget, "representation": cfg.representation,
                    "epsilon": cfg.epsilon, "variants": cfg.variants,
                    "records": {k: kinds.count(k) for k in sorted(set(kinds))},
                    "variants_used": sorted({int(r.variant) for r in res.records}),
                    "weight_error": float(np.sqrt(np.mean(
                        [e ** 2 for e in res.predicted_error.values()])))}
            rows.append(b.point(f"codec-{rep}", f"B{budget} eps{eps:g} v{n_var}", build))
    rows.append(b.compress("data-free", f"budget {budget}", CompressOptions(budget=budget)))
    return rows


def selected(rows: list[dict], rep: str, budget: int) -> dict | None:
    """The epsilon > 0 packet of ``rep`` at ``budget`` with the best validation accuracy."""
    cands = [r for r in rows if r["family"] == f"codec-{rep}" and "bytes" in r
             and r["budget"] == budget and r["epsilon"] > 0]
    return max(cands, key=lambda r: (r["val_accuracy"], -r["bytes"])) if cands else None


def table(rows: list[dict], ref: np.ndarray, budgets: list[int]) -> str:
    lines = ["| budget | packet | bytes | records | weight err | val acc | report acc [95% CI] "
             "| agree |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for budget in budgets:
        picks = [r for r in rows if r.get("budget") == budget]
        for rep in REPRESENTATIONS:
            best = selected(rows, rep, budget)
            if best is not None:
                picks.append({**best, "setting": f"selected on val: {best['setting']}",
                              "family": f"codec-{rep}"})
        for r in picks:
            if "bytes" not in r:
                lines.append(f"| {budget} | {r['family']} {r['setting']} | - | {r['error']} "
                             "| | | | |")
                continue
            agree = 100 * float(np.mean(np.asarray(r["predictions"]) == ref))
            recs = ", ".join(f"{k} {n}" for k, n in r.get("records", {}).items()) or "-"
            err = f"{r['weight_error']:.3f}" if "weight_error" in r else "-"
            lo, hi = r["ci95"]
            lines.append(f"| {budget} | {r['family']} {r['setting']} | {r['bytes']} | {recs} "
                         f"| {err} | {100 * r['val_accuracy']:.1f}% | {100 * r['accuracy']:.1f}% "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}] | {agree:.1f}% |")
    return "\n".join(lines)


def lm_points(lm: Path, name: str, budgets: list[int], eps_list: list[float],
              variants: int) -> list[dict]:
    """Decoder adapter ``name``: every packet's validation / report perplexity and agreement."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import lm_data
    from decoder_rd import WINDOWS, served
    from pretrain_lm import token_stream, windows
    from tokenizers import Tokenizer

    from solar_edge.exporters.compress import compress_adapter, prepare_adapter, sign_packet
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.format import signing
    from solar_edge.runtime.engine import EdgeRuntime

    bundle = load_bundle(lm / "bundle")
    tok = Tokenizer.from_file(str(lm / "base" / "tokenizer.json"))
    key = signing.generate_private_key()
    wins = windows(token_stream(tok, lm_data.texts(f"{name.split('-')[0]}-heldout")), WINDOWS)
    val_w, rep_w = wins[0::2], wins[1::2]
    adir = lm / "adapters" / name
    prep = prepare_adapter(read_adapter(adir), bundle)
    rt = EdgeRuntime(str(bundle.root), [key.public_key()], mechanism="lora", threads=1)
    version = iter(range(1, 10_000))
    bases = {lid: bundle.layer_basis(lid) for lid in prep.updates}
    extras = list(prep.extras.records)
    rows: list[dict] = []
    ref: dict[str, np.ndarray] = {}

    def measure(family: str, setting: str, make: Callable[[int], bytes],
                **extra: object) -> None:
        """``make(version)``: the signed packet (staged once per split: no rollback)."""
        val_ppl, val_top = served(rt, make(next(version)), val_w)
        data = make(next(version))
        ppl, top = served(rt, data, rep_w)
        if not ref:
            ref.update(val=val_top, rep=top)
        rows.append({"family": family, "setting": setting, "bytes": len(data), **extra,
                     "val_ppl": round(val_ppl, 3), "ppl": round(ppl, 3),
                     "top1_agreement": round(float((top == ref["rep"]).mean()), 4)})
        print(name, rows[-1], flush=True)

    measure("reference", "float32",
            lambda v: sign_packet(prep, lossless_records(prep), key, name, v)[0])
    overhead = len(sign_packet(prep, extras, key, name, 1)[0]) + 64
    for budget in budgets:
        for rep in REPRESENTATIONS:
            for eps in [0.0, *eps_list]:
                n_var = 1 if eps == 0 else variants
                res = encode(prep.updates, bases, CodecConfig(
                    epsilon=eps, variants=n_var, value_format=FORMATS, representation=rep,
                    budget_bytes=budget, overhead_bytes=overhead))
                kinds = [r.kind.name for r in res.records]
                measure(f"codec-{rep}", f"B{budget} eps{eps:g} v{n_var}",
                        lambda v, recs=res.records: sign_packet(prep, recs + extras, key,
                                                                name, v)[0],
                        budget=budget, epsilon=eps, records={
                            k: kinds.count(k) for k in sorted(set(kinds))})
        measure("data-free", f"budget {budget}", lambda v, budget=budget: compress_adapter(
            adir, bundle, key, CompressOptions(budget=budget), adapter_id=name,
            version=v).data, budget=budget)
    return rows


def lm_table(rows: list[dict], budgets: list[int]) -> str:
    lines = ["| budget | packet | bytes | records | val ppl | report ppl | top-1 agree |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for budget in budgets:
        picks = [r for r in rows if r.get("budget") == budget]
        for rep in REPRESENTATIONS:
            cands = [r for r in picks if r["family"] == f"codec-{rep}" and r["epsilon"] > 0]
            if cands:
                best = min(cands, key=lambda r: r["val_ppl"])
                picks.append({**best, "setting": f"selected on val: {best['setting']}"})
        for r in picks:
            recs = ", ".join(f"{k} {n}" for k, n in r.get("records", {}).items()) or "-"
            lines.append(f"| {budget} | {r['family']} {r['setting']} | {r['bytes']} | {recs} "
                         f"| {r['val_ppl']:.2f} | {r['ppl']:.2f} "
                         f"| {100 * r['top1_agreement']:.1f}% |")
    return "\n".join(lines)


def compact(rows: list[dict], budgets: list[int], eps_list: list[float]) -> str:
    """Report accuracy (and weight error) per budget and representation, one column per epsilon,
    then the epsilon > 0 packet chosen on validation and the data-free compress packet."""
    head = " | ".join(f"eps {e:g}" for e in [0.0, *eps_list])
    lines = [f"| budget | representation | bytes | {head} | chosen on val (eps > 0) | "
             "data-free compress |",
             "| --- " * (5 + len(eps_list)) + "| --- |"]
    for budget in budgets:
        free = next((r for r in rows if r["family"] == "data-free" and r["budget"] == budget
                     and "bytes" in r), None)
        for rep in REPRESENTATIONS:
            at = {r["epsilon"]: r for r in rows if r["family"] == f"codec-{rep}"
                  and r.get("budget") == budget and "bytes" in r}
            if 0.0 not in at:
                continue
            cells = [f"{100 * at[e]['accuracy']:.1f}% ({at[e]['weight_error']:.2f})"
                     if e in at else "-" for e in [0.0, *eps_list]]
            sizes = [at[e]["bytes"] for e in at]
            best = selected(rows, rep, budget)
            pick = (f"{100 * best['accuracy']:.1f}% (eps {best['epsilon']:g})"
                    if best else "-")
            free_cell = (f"{100 * free['accuracy']:.1f}% ({free['bytes']} B)" if free and rep
                         == "auto" else "")
            lines.append(f"| {budget} | {rep} | {min(sizes)}-{max(sizes)} | "
                         f"{' | '.join(cells)} | {pick} | {free_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="/tmp/rd-bundle")
    ap.add_argument("--adapters", default="artifacts/seqcls")
    ap.add_argument("--only", nargs="*", default=["pydoc-topics/seqcls-lora-qv-r8"])
    ap.add_argument("--budgets", default="4096,8192,16384")
    ap.add_argument("--eps", default="0.005,0.05,0.2")
    ap.add_argument("--variants", type=int, default=4, help="PRNG variants per layer (eps > 0)")
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--max-eval", type=int, default=300)
    ap.add_argument("--out", default="out/perturb/perturb.json")
    ap.add_argument("--lm", type=Path, default=None, help="decoder mode: e.g. artifacts/lm")
    ap.add_argument("--lm-adapters", nargs="+", default=["docs-all-r16"])
    args = ap.parse_args(argv)
    from solar_edge.exporters.tasks import load_task

    started = time.perf_counter()
    budgets = [int(x) for x in args.budgets.split(",")]
    eps_list = [float(x) for x in args.eps.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_suffix(".cache.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if args.lm is not None:
        lm_rows = {n: lm_points(args.lm, n, budgets, eps_list, args.variants)
                   for n in args.lm_adapters}
        out.write_text(json.dumps({"lm": str(args.lm), "budgets": budgets, "eps": eps_list,
                                   "variants": args.variants, "adapters": lm_rows}, indent=1))
        text = "\n\n".join(f"**{n}** (float32 packet {r[0]['bytes']} B, report ppl "
                            f"{r[0]['ppl']:.2f})\n\n{lm_table(r, budgets)}"
                            for n, r in lm_rows.items())
        out.with_suffix(".md").write_text(text + "\n")
        print(text)
        print(f"total wall time {time.perf_counter() - started:.0f} s")
        return 0
    bundle = load_bundle(args.bundle)
    bench_args = SimpleNamespace(packets=None, calib_texts=0, max_drop=0.5)
    results, tables = {}, []
    for adir in rd_served.seqcls_dirs(Path(args.adapters)):
        name = f"{adir.parent.name}/{adir.name}"
        if args.only and name not in args.only:
            continue
        task = load_task(adir.parent.name)
        splits = rd_served.task_splits(task, out.parent / "calib", args.val, args.max_eval, 0)
        meter = rd_served.ServedMeter(str(bundle.root), splits)
        adapter = read_adapter(adir)
        b = rd_served.ServedBench(name, adir, adapter, adir / "adapter_model.safetensors",
                                  bundle, meter, splits, cache, bench_args)
        b.save = lambda: cache_path.write_text(json.dumps(cache))
        print(f"{name}: validation {len(splits.val_texts)}, report {len(splits.texts)}",
              flush=True)
        ref = b.reference()
        rows = [r for budget in budgets for r in codec_points(b, budget, eps_list,
                                                              args.variants)]
        md = table([ref, *rows], np.asarray(ref["predictions"]), budgets)
        tables.append(f"**{name}** (lossless packet {ref['bytes']} B, report "
                      f"{100 * ref['accuracy']:.1f}%)\n\n{compact(rows, budgets, eps_list)}"
                      f"\n\n{md}")
        results[name] = {"reference": ref, "points": rows}
        out.write_text(json.dumps({"bundle": str(args.bundle), "budgets": budgets,
                                   "eps": eps_list, "variants": args.variants,
                                   "val": args.val, "max_eval": args.max_eval,
                                   "adapters": results}, indent=1, default=float))
    text = "\n\n".join(tables)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
