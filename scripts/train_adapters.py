"""Train every adapter kind on every offline task into ``--out`` and print a summary table.

    python scripts/train_adapters.py [--out artifacts/adapters] [--steps 40] [--kinds ...]

Each adapter lands in ``OUT/<task>/<kind>/`` (PEFT files + task.json). The frozen-head
baseline (no adapter) is evaluated once per task on the same held-out set. Adapters whose
task.json (and base.json) already exist are reused unless ``--force``.
``OUT/summary.json`` holds the table.

SEQ_CLS kinds (:mod:`solar_edge.exporters.train_peft`): adapters trained the way a typical
user would, with standard PEFT (``LoraConfig(task_type="SEQ_CLS")``) and the model's own
classifier head, which trains with them: ``seqcls-lora-qv-r8``, ``seqcls-lora-all-r16``,
``seqcls-dora-qv-r8``, and the ``seqcls-head-only`` baseline (frozen encoder, classifier
alone), trained first on every task whenever a SEQ_CLS kind is asked for. Each lands in
``OUT/<task>/<kind>/`` with PEFT's files, the model's config.json (id2label) and
metrics.json (no task.json), reused when metrics.json exists unless ``--force``. Without
``--steps`` each trains for its kind's default steps (``--steps`` applies to every kind
trained in the run). All SEQ_CLS kinds on both tasks, with the kinds' defaults:

    python scripts/train_adapters.py --out artifacts/seqcls --kinds seqcls-head-only \
        seqcls-lora-qv-r8 seqcls-dora-qv-r8 seqcls-lora-all-r16

stdlib-docs (1478 training texts, a strong head-only baseline) needs more steps for a clear
margin; artifacts/seqcls was trained with the command above for pydoc-topics
(``--tasks pydoc-topics``) and with ``--tasks stdlib-docs --steps 600`` (head-only kept at
its default 1000) for stdlib-docs. Run the command above again to print both tasks' table.
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
from solar_edge.exporters.train_peft import HEAD_ONLY, SeqClsConfig, train_seqcls  # noqa: E402
from solar_edge.exporters.train_peft import KINDS as SEQCLS_KINDS  # noqa: E402

SEEDED_STEPS = 40  # default --steps of the seeded-head kinds


def fmt_row(task: str, kind: str, m: dict) -> str:
    lo, hi = m["ci95"]
    params = m.get("trainable_params", 0)
    return (f"{task:<13} {kind:<19} {100 * m['accuracy']:6.1f}  [{100 * lo:5.1f}, {100 * hi:5.1f}]"
            f"  {m['n']:>5}  {params:>8}  {2 * params:>9}  {m.get('steps', 0):>5}"
            f"  {m.get('train_seconds', 0):7.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="artifacts/adapters")
    ap.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS),
                    choices=list(KINDS) + list(SEQCLS_KINDS))
    ap.add_argument("--steps", type=int, default=None,
                    help=f"optimiser steps per adapter (default: {SEEDED_STEPS} for the "
                         "seeded-head kinds, the kind's own default for SEQ_CLS kinds)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--max-train", type=int, default=None, help="cap training set (default: all)")
    ap.add_argument("--max-test", type=int, default=None, help="cap held-out set (default: all)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the kind's)")
    ap.add_argument("--head-seed", type=int, default=1234)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="retrain adapters that exist")
    args = ap.parse_args(argv)

    out = Path(args.out)
    seeded = [k for k in args.kinds if k in KINDS]
    seqcls = [k for k in args.kinds if k in SEQCLS_KINDS and k != HEAD_ONLY]
    if seqcls or HEAD_ONLY in args.kinds:
        seqcls.insert(0, HEAD_ONLY)  # the baseline of the others, so first
    base = load_base() if seeded else None
    rows: list[dict] = []
    header = (f"{'task':<13} {'adapter':<19} {'acc %':>6}  {'95% CI':^14}  {'n':>5}  "
              f"{'params':>8}  {'fp16 B':>9}  {'steps':>5}  {'train s':>7}")
    common = dict(max_len=args.max_len, batch_size=args.batch_size, max_train=args.max_train,
                  max_test=args.max_test, seed=args.seed, threads=args.threads, lr=args.lr)
    tasks = {name: load_task(name) for name in args.tasks}
    base_metrics = {}
    for task_name, task in tasks.items():
        print(task.describe(), flush=True)
        if not seeded:
            continue
        base_path = out / task_name / "base.json"
        if base_path.is_file() and not args.force:
            base_metrics[task_name] = json.loads(base_path.read_text())
        else:
            config = TrainConfig(head_seed=args.head_seed, **common)
            base_metrics[task_name] = evaluate_base(task, config, base)
            base_path.parent.mkdir(parents=True, exist_ok=True)
            base_path.write_text(json.dumps(base_metrics[task_name], indent=2) + "\n")
        rows.append({"task": task_name, "kind": "base", **base_metrics[task_name]})
        print(fmt_row(task_name, "base", base_metrics[task_name]), flush=True)
    # Kind-major, so the kinds listed first are ready on every task soonest.
    for kind in seeded:
        for task_name, task in tasks.items():
            target = out / task_name / kind
            meta_path = target / "task.json"
            if meta_path.is_file() and not args.force:
                metrics = json.loads(meta_path.read_text())["metrics"]
            else:
                started = time.perf_counter()
                config = TrainConfig(kind=kind, steps=args.steps or SEEDED_STEPS,
                                     head_seed=args.head_seed, **common)
                metrics = train_adapter(task, target, config, base,
                                        base_metrics[task_name]).metrics
                metrics["total_seconds"] = time.perf_counter() - started
                meta = json.loads(meta_path.read_text())
                meta["metrics"] = metrics
                meta_path.write_text(json.dumps(meta, indent=2) + "\n")
            rows.append({"task": task_name, "kind": kind, **metrics})
            print(fmt_row(task_name, kind, metrics), flush=True)
    head_only: dict[str, dict] = {}
    for kind in seqcls:
        for task_name, task in tasks.items():
            target = out / task_name / kind
            metrics_path = target / "metrics.json"
            if metrics_path.is_file() and not args.force:
                metrics = json.loads(metrics_path.read_text())
                baseline = head_only.get(task_name)
                if kind != HEAD_ONLY and baseline is not None:  # keep the baseline current
                    metrics["head_only"] = {k: baseline[k]
                                            for k in ("accuracy", "ci95", "correct", "n")}
                    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
            else:
                started = time.perf_counter()
                config = SeqClsConfig(kind=kind, steps=args.steps, **common)
                metrics = train_seqcls(task, target, config, head_only.get(task_name)).metrics
                metrics["total_seconds"] = time.perf_counter() - started
                metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
            if kind == HEAD_ONLY:
                head_only[task_name] = metrics
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
