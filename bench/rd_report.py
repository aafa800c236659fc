"""Reports of the rate-distortion benchmark (``bench/rd.py``): summary, tables, plot.

:func:`summarise` picks, per adapter, the smallest codec packet and the smallest baseline
packet within the tolerance of the uncompressed adapter's accuracy, and their byte ratio;
:func:`markdown_table` writes those (at 0.5 and 2 points) as markdown, :func:`print_table`
as text, :func:`plot` accuracy versus bytes (one panel per adapter). The tolerances and the
family groups (what is ranked as codec, what as baseline) are defined here.
"""

from __future__ import annotations

from pathlib import Path

TOLERANCE = 0.005  # "within 0.5 point of the uncompressed adapter"
LOOSE = 0.02  # a second, noise-level tolerance reported beside it
BASELINE_FAMILIES = ("lora-fp16", "lora-int", "rank", "random-basis", "naive-solar")
CODEC_FAMILIES = ("codec", "fisher", "refit", "actaware", "frobenius", "carry")
SUMMARY_KEYS = ("family", "setting", "bytes", "accuracy", "agreement")
ABLATION_FAMILIES = ("rank+refit",)  # the refit on a baseline's records: reported, not ranked


def summarise(name: str, points: list[dict], meta: dict, tolerance: float = TOLERANCE) -> dict:
    """Smallest codec and baseline packets within ``tolerance`` of the reference accuracy."""
    ref = next(p for p in points if p["family"] == "reference")
    floor = ref["accuracy"] - tolerance
    ok = [p for p in points if p.get("accuracy", -1) >= floor - 1e-12]

    def smallest(families: tuple[str, ...]) -> dict | None:
        c = [p for p in ok if p["family"] in families]
        return min(c, key=lambda p: p["bytes"]) if c else None

    best_codec, best_base = smallest(CODEC_FAMILIES), smallest(BASELINE_FAMILIES)
    ratio = (best_base["bytes"] / best_codec["bytes"]) if best_codec and best_base else None
    return {"adapter": name, "reference_accuracy": ref["accuracy"], "reference_ci95": ref["ci95"],
            "trained_accuracy_full_test": meta.get("metrics", {}).get("accuracy"),
            "trainable_params": meta.get("metrics", {}).get("trainable_params"),
            "smallest_codec": best_codec and {k: best_codec[k] for k in SUMMARY_KEYS
                                              if k in best_codec},
            "smallest_baseline": best_base and {k: best_base[k] for k in SUMMARY_KEYS
                                                if k in best_base},
            "ratio": ratio}


def markdown_table(results: dict) -> str:
    """Per adapter: smallest codec packet within tolerance vs the best baseline, and ratio."""
    lines = ["| adapter | uncompressed acc (n) | fp16 LoRA B | smallest codec packet within "
             "0.5 pt | best baseline within 0.5 pt | baseline / codec |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(results.items()):
        s, pts = r["summary"], r["points"]
        fp16 = next((p["bytes"] for p in pts if p["family"] == "lora-fp16"), None)
        ref = next(p for p in pts if p["family"] == "reference")

        def cell(x: dict | None) -> str:
            if not x:
                return "none"
            agree = f", agree {100 * x['agreement']:.0f}%" if "agreement" in x else ""
            return (f"{x['bytes']} B ({x['family']} {x['setting']}, {100 * x['accuracy']:.1f}%"
                    f"{agree})")

        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        lines.append(f"| {name} | {100 * ref['accuracy']:.1f}% ({ref['n']}) | {fp16} | "
                     f"{cell(s['smallest_codec'])} | {cell(s['smallest_baseline'])} | {ratio} |")
    lines += ["", f"Within {100 * LOOSE:g} points:", "",
              "| adapter | smallest codec packet | best baseline | baseline / codec |",
              "| --- | --- | --- | --- |"]
    for name, r in sorted(results.items()):
        s = summarise(name, r["points"], {}, LOOSE)
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        lines.append(f"| {name} | {cell(s['smallest_codec'])} | {cell(s['smallest_baseline'])}"
                     f" | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    style = {"reference": ("k", "*"), "lora-fp16": ("0.4", "s"), "lora-int": ("tab:blue", "o"),
             "rank": ("tab:orange", "^"), "random-basis": ("tab:gray", "x"),
             "naive-solar": ("tab:brown", "v"), "codec": ("tab:purple", "D"),
             "actaware": ("tab:olive", "o"), "fisher": ("tab:cyan", "h"),
             "refit": ("tab:red", "D"), "rank+refit": ("tab:orange", "D"),
             "frobenius": ("tab:pink", "P"),
             "carry": ("tab:green", "*")}
    for ax, name in zip(axes.flat, names, strict=False):
        pts = results[name]["points"]
        ref = next(p for p in pts if p["family"] == "reference")
        ax.axhline(100 * ref["accuracy"], color="k", lw=0.8)
        ax.axhspan(100 * (ref["accuracy"] - TOLERANCE), 100 * ref["accuracy"], color="0.85")
        for fam, (color, marker) in style.items():
            fp = sorted((p for p in pts if p["family"] == fam and "accuracy" in p),
                        key=lambda p: p["bytes"])
            if fp:
                ax.plot([p["bytes"] for p in fp], [100 * p["accuracy"] for p in fp],
                        marker=marker, color=color, label=fam, lw=1 if len(fp) > 1 else 0)
        style_panel(ax, name, "held-out accuracy %")
    save_panels(fig, axes, len(names), path)


def style_panel(ax, name: str, ylabel: str) -> None:
    """One adapter's panel: log bytes on x, accuracy on y."""
    ax.set_xscale("log")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("signed packet bytes")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def save_panels(fig, axes, used: int, path: Path) -> None:
    """Blank the unused panels, put the legend on the first, write the PNG."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def forget_unchecked(cache: dict, tag: str, summary: dict) -> None:
    """Drop the cached summary points that have no prediction agreement, so the run rebuilds
    (re-encodes, re-refits) and re-evaluates exactly those packets."""
    for point in (summary.get("smallest_codec"), summary.get("smallest_baseline")):
        if point and "agreement" not in point:
            cache.pop(f"{tag}|{point['family']}|{point['setting']}", None)


def print_table(results: dict) -> None:
    """The run's summary as a text table on stdout."""
    print("\nadapter                      ref acc  smallest codec (B)   best baseline (B)   ratio")
    for name, r in results.items():
        s = r["summary"]
        c, bl = s["smallest_codec"], s["smallest_baseline"]
        print(f"{name:<28} {100 * s['reference_accuracy']:6.1f}  "
              f"{(c['bytes'] if c else '-')!s:>10} {(c['family'] if c else ''):<9}"
              f"{(bl['bytes'] if bl else '-')!s:>10} {(bl['setting'] if bl else ''):<10}"
              f"{s['ratio'] if s['ratio'] is None else round(s['ratio'], 2)}")
