"""Export MiniLM for every device profile: bytes of graph, base weights, bases; export time.

    python bench/export.py [--profiles rpi4,x86-64] [--model DIR|module:function]
                           [--json out/bench_export.json]

Prints a table and writes the rows as JSON. Columns: ``graph`` = ``model.onnx`` (graph
only), ``variants`` = extra graphs for runtime mechanisms, ``other`` = ``model.onnx.data``
(embeddings, norms: the non-adaptable weights), ``W0`` = ``weights/`` (adaptable base
weights, shared by the ONNX graph), ``basis`` = ``basis/``, ``tflite`` = ``model.tflite``.
Bundles are written to a temporary directory and deleted. A TFLite profile needs the
optional converter (``litert-torch``); without it the row says so instead of failing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from solar_edge.errors import ExportError  # noqa: E402
from solar_edge.exporters.pipeline import export_bundle  # noqa: E402
from solar_edge.profiles.device import known_profiles, load_profile  # noqa: E402


def _bytes_under(root: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in (root / prefix).rglob("*") if p.is_file()) \
        if (root / prefix).is_dir() else 0


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def measure(model: str | None, profile: str, work: Path) -> dict:
    prof = load_profile(profile)
    out = work / profile
    row: dict = {"profile": profile, "backend": prof.backend, "basis_dtype": prof.basis_dtype,
                 "basis_budget_mb": prof.basis_budget_mb}
    start = time.perf_counter()
    try:
        result = export_bundle(model, prof, out)
    except ExportError as exc:
        row["error"] = str(exc)
        return row
    row["export_s"] = round(time.perf_counter() - start, 2)
    row["seconds"] = {k: round(v, 2) for k, v in result.seconds.items()}
    ranks = sorted({layer.rank for layer in result.bundle.layers})
    row.update(
        layers=len(result.bundle.layers),
        ranks=ranks,
        onnx_graph_bytes=_size(out / "model.onnx"),
        onnx_data_bytes=_size(out / "model.onnx.data"),
        variant_bytes=sum(_size(p) for p in out.glob("model.*.onnx")),
        tflite_bytes=_size(out / "model.tflite"),
        base_weight_bytes=_bytes_under(out, "weights"),
        basis_bytes=_bytes_under(out, "basis"),
        tflite_fold_bytes=_bytes_under(out, "tflite"),
        tokenizer_bytes=_bytes_under(out, "tokenizer"),
        total_bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        fingerprint=result.bundle.fingerprint.hex(),
        max_abs_diff_onnx_vs_torch=result.max_abs_diff_onnx,
    )
    return row


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def table(rows: list[dict]) -> str:
    head = ("profile", "backend", "basis", "rank", "graph KB", "variants KB", "other MB",
            "W0 MB", "basis MB", "tflite MB", "total MB", "export s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['profile']} | {r['backend']} | {r['basis_dtype']} | "
                         f"not exported: {r['error']}")
            continue
        rank = "/".join(str(x) for x in r["ranks"])
        lines.append(" | ".join([
            r["profile"], r["backend"], r["basis_dtype"], rank,
            f"{r['onnx_graph_bytes'] / 1e3:.0f}", f"{r['variant_bytes'] / 1e3:.0f}",
            _mb(r["onnx_data_bytes"]), _mb(r["base_weight_bytes"]), _mb(r["basis_bytes"]),
            _mb(r["tflite_bytes"]) if r["tflite_bytes"] else "-", _mb(r["total_bytes"]),
            f"{r['export_s']:.1f}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default=",".join(known_profiles()))
    ap.add_argument("--model", default=None, help="default: embedded all-MiniLM-L6-v2")
    ap.add_argument("--json", default="out/bench_export.json")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for profile in [p.strip() for p in args.profiles.split(",") if p.strip()]:
            print(f"exporting for {profile} ...", file=sys.stderr, flush=True)
            rows.append(measure(args.model, profile, Path(tmp)))
    print(table(rows))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model or "all-MiniLM-L6-v2", "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
