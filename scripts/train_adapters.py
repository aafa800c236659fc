"""Train every adapter kind on every offline task into ``--out`` and print a summary table.

    python scripts/train_adapters.py [--out artifacts/adapters] [--steps 40] [--kinds ...]

Each adapter lands in ``OUT/<task>/<kind>/`` (PEFT files + task.json). The frozen-head
baseline (no adapter) is evaluated once per task on the same held-out set. Adapters whose
task.json (and base.json) already exist are reused unless ``--force``.
``OUT/summary.json`` holds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from solar_edge.exporters.tasks import TASKS, load_task  # noqa: E402
from solar_edge.exporters.train import (  # noqa: E402
    KINDS,
    TrainConfig,
    evaluate_base,
    load_base,
    train_adapter,
)


def fmt_row(task: str, kind: str, m: dict) -> str:
    lo, hi = m["ci95"]
    params = m.get("trainable_params", 0)
    return (f"{task:<13} {kind:<13} {100 * m['accuracy']:6.1f}  [{100 * lo:5.1f}, {100 * hi:5.1f}]"
            f"  {m['n']:>5}  {params:>8}  {2 * params:>9}  {m.get('train_seconds', 0):6.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="artifacts/adapters")
    ap.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per adapter")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--max-test", type=int, default=None, help="cap held-out set (default: all)")
    ap.add_argument("--head-seed", type=int, default=1234)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="retrain adapters that exist")
    args = ap.parse_args(argv)

    out = Path(args.out)
    base = load_base()
    rows: list[dict] = []
    header = (f"{'task':<13} {'adapter':<13} {'acc %':>6}  {'95% CI':^14}  {'n':>5}  "
              f"{'params':>8}  {'fp16 B':>9}  {'train s':>6}")
    common = dict(max_len=args.max_len, batch_size=args.batch_size, max_test=args.max_test,
                  head_seed=args.head_seed, seed=args.seed, threads=args.threads)
    tasks = {name: load_task(name) for name in args.tasks}
    base_metrics = {}
    for task_name, task in tasks.items():
        print(task.describe(), flush=True)
        base_path = out / task_name / "base.json"
        if base_path.is_file() and not args.force:
            base_metrics[task_name] = json.loads(base_path.read_text())
        else:
            base_metrics[task_name] = evaluate_base(task, TrainConfig(**common), base)
            base_path.parent.mkdir(parents=True, exist_ok=True)
            base_path.write_text(json.dumps(base_metrics[task_name], indent=2) + "\n")
        rows.append({"task": task_name, "kind": "base", **base_metrics[task_name]})
        print(fmt_row(task_name, "base", base_metrics[task_name]), flush=True)
    # Kind-major, so the kinds listed first are ready on every task soonest.
    for kind in args.kinds:
        for task_name, task in tasks.items():
            target = out / task_name / kind
            meta_path = target / "task.json"
            if meta_path.is_file() and not args.force:
                metrics = json.loads(meta_path.read_text())["metrics"]
            else:
                started = time.perf_counter()
                config = TrainConfig(kind=kind, steps=args.steps, **common)
                metrics = train_adapter(task, target, config, base,
                                        base_metrics[task_name]).metrics
                metrics["total_seconds"] = time.perf_counter() - started
                meta = json.loads(meta_path.read_text())
                meta["metrics"] = metrics
                meta_path.write_text(json.dumps(meta, indent=2) + "\n")
            rows.append({"task": task_name, "kind": kind, **metrics})
            print(fmt_row(task_name, kind, metrics), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print()
    print(header)
    for row in rows:
        print(fmt_row(row["task"], row["kind"], row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
