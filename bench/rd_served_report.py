"""Reports of the served benchmark (``bench/rd_served.py``): summary, JSON, markdown, plot.

Per adapter (:func:`summarise`), with ``D`` = ``--max-drop`` points (default 0.5):

* the best plain baseline: the smallest ``lora-int`` / ``rank`` packet that loses at most
  ``D`` points of VALIDATION texts the reference packet gets right (``val_lost``, the
  criterion ``compress --max-drop`` uses; chosen on validation, its report accuracy is what
  is reported);
* the calibrated codec's ``--max-drop`` packet with compress's default refit setting
  (``cli_default``; the other setting is ``calibrated_other``), and ``ratio`` = its bytes /
  the baseline's;
  the goal is met when ``ratio <= 1/3``;
* the data-free check: at each baseline's bytes, the data-free packet with that budget must
  reach at least the baseline's report accuracy; ``worst_margin`` is the smallest
  difference in points (negative: a miss), ``None`` entries mean no data-free packet fits.

:func:`write` writes ``<out>.json``, ``<out>.md`` (tables to paste) and ``<out>.png``
(report accuracy vs bytes, log x, one panel per adapter).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from rd_eval import mcnemar_p
from rd_report import save_panels, style_panel

BASELINES = ("lora-int", "rank")
GOAL = 1 / 3
ALPHA = 0.05  # a data-free margin below 0 counts as a loss when its paired test says so
NO_COVER = "no-cover"  # setting suffix: data-free that may leave layers out (cover=False)
STYLE = {"reference": ("k", "*"), "lora-int": ("tab:blue", "o"), "rank": ("tab:orange", "^"),
         "data-free": ("tab:green", "s"), "calibrated": ("tab:red", "D")}


def point_line(r: dict) -> str:
    if "bytes" not in r:
        return f"{r['family']:<11} {r['setting']:<18} -- {r['error']}"
    cpu = f"cpu {r['cpu_s']:.0f}s" if "cpu_s" in r else ""
    return (f"{r['family']:<11} {r['setting']:<18} {r['bytes']:>9} B  val "
            f"{100 * r['val_accuracy']:5.1f}%  report {100 * r['accuracy']:5.1f}%  {cpu}")


def find(points: list[dict], family: str, setting: str) -> dict | None:
    return next((p for p in points if p["family"] == family and p["setting"] == setting
                 and "bytes" in p), None)


def best_baseline(points: list[dict], max_drop: float = 0.5) -> dict | None:
    """Smallest plain baseline within ``max_drop`` on validation, by the criterion of
    ``compress --max-drop`` (``val_lost``: texts the reference gets right and it wrong)."""
    ok = [p for p in points if p["family"] in BASELINES and "bytes" in p
          and p["val_lost"] <= max_drop + 1e-9]
    return min(ok, key=lambda p: p["bytes"]) if ok else None


def summarise(points: list[dict], max_drop: float,
              right: dict[tuple[str, str], list[bool]] | None = None) -> dict[str, Any]:
    """``right``: per (family, setting), which report texts the packet gets right; with it
    each data-free margin also gets its paired test (:func:`rd_eval.mcnemar_p`)."""
    best = best_baseline(points, max_drop)
    searches = [p for p in points if p["family"] == "calibrated" and "bytes" in p
                and p["setting"].startswith(f"max-drop {max_drop:g}")]
    cal = next((p for p in searches if p.get("cli_default")), None)  # compress's default
    other = next((p for p in searches if p is not cal), None)  # the other refit setting
    ratio = cal["bytes"] / best["bytes"] if cal and best else None
    margins = data_free_margins(points, right)
    known = [m["margin"] for m in margins if m["margin"] is not None]
    below = [m for m in margins if (m["margin"] or 0) < 0 and m.get("p", 1.0) < ALPHA]
    return {"best_baseline": best and {k: best[k] for k in ("setting", "bytes", "val_accuracy",
                                                            "val_lost", "accuracy", "ci95")},
            "calibrated": cal and {k: cal.get(k) for k in ("bytes", "val_accuracy", "accuracy",
                                                           "ci95", "agreement", "cpu_s")},
            "calibrated_other": other and {k: other.get(k) for k in (
                "setting", "refit_steps", "bytes", "val_accuracy", "accuracy", "ci95",
                "agreement", "cpu_s")},
            "ratio_other": other["bytes"] / best["bytes"] if other and best else None,
            "ratio": ratio, "goal_met": None if ratio is None else ratio <= GOAL,
            "data_free_margins": margins, "worst_margin": min(known) if known else None,
            "data_free_ok": bool(margins) and all(m is not None and m >= -1e-9
                                                  for m in (x["margin"] for x in margins)),
            "data_free_significantly_below": (None if not right else
                                              [m["baseline"] for m in below]),
            "data_free_variants": {v: data_free_margins(points, right, f" {v}")
                                   for v in variant_suffixes(points)}}


def quant_suffix(weight: float) -> str:
    """Setting suffix of a data-free point at ``quant_weight=weight``."""
    return f"q{weight:g}"


def variant_suffixes(points: list[dict]) -> list[str]:
    """The data-free variants measured at the baselines' bytes: ``no-cover``, ``qG``."""
    found = {p["setting"].split(" ", 2)[2] for p in points
             if p["family"] == "data-free" and p["setting"].startswith("budget ")
             and len(p["setting"].split(" ")) == 3}
    return sorted(v for v in found if v == NO_COVER or re.fullmatch(r"q[0-9.]+", v))


def data_free_margins(points: list[dict], right: dict[tuple[str, str], list[bool]] | None,
                      suffix: str = "") -> list[dict[str, Any]]:
    """Data-free (setting ``budget N`` + ``suffix``) against each plain baseline at its
    bytes: report and validation accuracy margins in points, paired test with ``right``."""
    out = []
    for b in (p for p in points if p["family"] in BASELINES and "bytes" in p):
        d = find(points, "data-free", f"budget {b['bytes']}{suffix}")
        if d is None and suffix:
            continue
        out.append({"baseline": b["setting"], "bytes": b["bytes"],
                    "margin": None if d is None else 100 * (d["accuracy"] - b["accuracy"]),
                    "val_margin": None if d is None else
                    100 * (d["val_accuracy"] - b["val_accuracy"]),
                    **(paired(right, d, b) if right and d else {})})
    return out


def paired(right: dict[tuple[str, str], list[bool]], a: dict, b: dict) -> dict[str, Any]:
    """Report texts only ``a`` gets right, only ``b`` gets right, and the exact McNemar p."""
    ra, rb = right[(a["family"], a["setting"])], right[(b["family"], b["setting"])]
    only_a = sum(x and not y for x, y in zip(ra, rb, strict=True))
    only_b = sum(y and not x for x, y in zip(ra, rb, strict=True))
    return {"only_data_free": only_a, "only_baseline": only_b, "p": mcnemar_p(only_a, only_b)}


def adapter_result(rows: list[dict], torch_row: dict, head_only: bool,
                   max_drop: float, labels: list[int] | None = None) -> dict[str, Any]:
    """Rows without predictions, with agreement (report split) with the reference packet;
    with the report ``labels``, the data-free margins get their paired tests."""
    ref = rows[0]["predictions"]
    right = None if labels is None else {
        (r["family"], r["setting"]): [int(p) == int(y) for p, y in zip(r["predictions"], labels,
                                                                       strict=True)]
        for r in rows if "predictions" in r}
    points = []
    for r in rows:
        p = {k: v for k, v in r.items() if k not in ("predictions", "val_predictions")}
        if "predictions" in r:
            p["agreement"] = sum(a == b for a, b in zip(r["predictions"], ref, strict=True)
                                 ) / len(ref)
        points.append(p)
    torch = {k: v for k, v in torch_row.items() if k != "predictions"}
    torch["agreement_with_served"] = sum(
        a == b for a, b in zip(torch_row["predictions"], ref, strict=True)) / len(ref)
    return {"head_only": head_only, "points": points, "torch": torch,
            "summary": None if head_only else summarise(points, max_drop, right)}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _lost(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} pt"


def markdown(results: dict, max_drop: float) -> str:
    d = f"{max_drop:g}"
    lines = [f"| adapter | torch PEFT | served lossless packet | adapter file / lossless packet "
             f"| best plain baseline (within {d} pt on val) "
             f"| calibrated codec, compress default (max-drop {d}) "
             f"| calibrated / baseline (goal <= 1/3) | calibrated, other refit setting "
             f"| data-free (max-drop {d}) "
             "| data-free >= baseline at equal bytes (worst margin) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(results.items()):
        ref, t, s = r["points"][0], r["torch"], r["summary"]
        lo, hi = ref["ci95"]
        served = f"{_pct(ref['accuracy'])} [{100 * lo:.1f}, {100 * hi:.1f}] (n={ref['n']})"
        sizes = f"{ref['file_bytes']} B / {ref['bytes']} B"
        if r["head_only"]:
            lines.append(f"| {name} (base + trained head) | {_pct(t['accuracy'])} | {served} "
                         f"| {sizes} | - | - | - | - | - | - |")
            continue
        best, cal = s["best_baseline"], s["calibrated"]
        base = f"{best['bytes']} B ({best['setting']}, {_pct(best['accuracy'])})" if best \
            else "none"
        calc = (f"{cal['bytes']} B ({_pct(cal['accuracy'])}, agree {_pct(cal['agreement'])})"
                if cal else "none")
        ratio = "-" if s["ratio"] is None else (
            f"{s['ratio']:.3f} ({'met' if s['goal_met'] else 'missed'})")
        other = s.get("calibrated_other")
        barec = "-" if not other else (
            f"{other['bytes']} B (refit {other['refit_steps']}, {_pct(other['accuracy'])}"
            + (f", ratio {s['ratio_other']:.3f})" if s["ratio_other"] is not None else ")"))
        df = next((p for p in r["points"] if p["family"] == "data-free"
                   and p["setting"] == f"max-drop {d}"), None)
        dfc = f"{df['bytes']} B ({_pct(df['accuracy'])})" if df and "bytes" in df else "none"
        worst = s["worst_margin"]
        check = "-" if worst is None else (f"{'yes' if s['data_free_ok'] else 'no'} "
                                           f"({worst:+.1f} pt)")
        if worst is not None and s.get("data_free_significantly_below") is not None:
            sig = s["data_free_significantly_below"]
            check += (f"; significantly below (p < {ALPHA:g}) at {', '.join(sig)}" if sig else
                      f"; never significantly below (paired, p < {ALPHA:g})")
        lines.append(f"| {name} | {_pct(t['accuracy'])} | {served} | {sizes} | {base} | {calc} "
                     f"| {ratio} | {barec} | {dfc} | {check} |")
    lines += variants_markdown(results)
    lines += ["", "Report accuracy of every packet (agreement: report predictions equal to "
              "the lossless packet's):"]
    for name, r in sorted(results.items()):
        lines += ["", f"**{name}**", "",
                  "| family | setting | bytes | val acc | val lost | report acc [95% CI] | agree "
                  "| calib texts (fisher / refit) | CPU s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in sorted(r["points"], key=lambda p: (p["family"], p.get("bytes", 0))):
            if "bytes" not in p:
                lines.append(f"| {p['family']} | {p['setting']} | - | - | - | {p['error'][:60]} "
                             "| - | - | - |")
                continue
            lo, hi = p["ci95"]
            calib = (f"{p.get('fisher_texts', 0)} / {p['refit_texts']}"
                     if p.get("calibration") else "-")
            lines.append(f"| {p['family']} | {p['setting']} | {p['bytes']} | "
                         f"{_pct(p['val_accuracy'])} | {_lost(p.get('val_lost'))} | "
                         f"{_pct(p['accuracy'])} [{100 * lo:.1f}, "
                         f"{100 * hi:.1f}] | {_pct(p['agreement'])} | {calib} | "
                         f"{p.get('cpu_s', '-')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in sorted(results.items()) if not r["head_only"]]
    if not names:
        return
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = results[name]["points"]
        head = results.get(f"{name.split('/')[0]}/seqcls-head-only")
        if head:
            ax.axhline(100 * head["points"][0]["accuracy"], color="0.5", ls="--", lw=0.8,
                       label="base + trained head")
        ax.axhline(100 * pts[0]["accuracy"], color="k", lw=0.8)
        for fam, (color, marker) in STYLE.items():
            fp = sorted((p for p in pts if p["family"] == fam and "bytes" in p
                         and not p["setting"].startswith("max-drop")), key=lambda p: p["bytes"])
            if fp:
                ax.plot([p["bytes"] for p in fp], [100 * p["accuracy"] for p in fp],
                        marker=marker, color=color, label=fam, lw=1 if len(fp) > 1 else 0)
            for p in pts:
                if p["family"] == fam and p["setting"].startswith("max-drop") and "bytes" in p:
                    ax.plot([p["bytes"]], [100 * p["accuracy"]], marker="*", markersize=15,
                            color=color, ls="", label=f"{fam} max-drop")
        style_panel(ax, name, "served report accuracy %")
    save_panels(fig, axes, len(names), path)
    plt.close(fig)


def write(out: Path, bundle: Any, args: Any, results: dict, wall_s: float) -> None:
    meta = {"bundle": str(bundle.root), "fingerprint": bundle.fingerprint.hex(),
            "split": "task test split in a fixed seeded order: validation = first --val, "
                     "report = the next --max-eval; calibration = evenly spaced training texts",
            "val": args.val, "max_eval": args.max_eval, "calib_texts": args.calib_texts,
            "max_drop": args.max_drop, "wall_s": round(wall_s, 1)}
    out.write_text(json.dumps({**meta, "adapters": results}, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(results, args.max_drop))
    plot(results, out.with_suffix(".png"))


def variants_markdown(results: dict) -> list[str]:
    """The data-free default and its variants (``no-cover``, ``qG``) at the baselines' bytes:
    validation and report margins against each baseline (mean / worst, points), and how many
    are significantly below."""
    rows = []
    for name, r in sorted(results.items()):
        s = r["summary"]
        if not s or not s.get("data_free_variants"):  # a head-only reference, or no variants
            continue
        for label, ms in (("default", s["data_free_margins"]),
                          *s["data_free_variants"].items()):
            known = [m for m in ms if m["margin"] is not None]
            if not known:
                continue
            val = [m["val_margin"] for m in known]
            rep = [m["margin"] for m in known]
            sig = sum(1 for m in known if m["margin"] < 0 and m.get("p", 1.0) < ALPHA)
            rows.append(f"| {name} | {label} | {len(known)} | {np.mean(val):+.2f} / "
                        f"{min(val):+.1f} | {np.mean(rep):+.2f} / {min(rep):+.1f} | {sig} |")
    if not rows:
        return []
    return ["", "Data-free against each plain baseline at its bytes, the default and its "
            f"variants ({NO_COVER}: without the cover rule; qG: quantisation error weighed G; "
            "margins in points, mean / worst; validation chooses):", "",
            "| adapter | data-free | sizes | validation margin | report margin "
            f"| significantly below (p < {ALPHA:g}) |", "| --- | --- | --- | --- | --- | --- |",
            *rows]
