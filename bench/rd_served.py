"""Served accuracy of standard PEFT classifiers versus signed packet bytes (``bench/rd.py``).

    nice -n 10 python bench/rd.py --bundle /tmp/rd-bundle --adapters artifacts/seqcls \
        --out out/rd-seqcls.json [--val 200] [--max-eval 1000] [--calib-texts 256] [--curve]

Every ``ADAPTERS/<task>/<kind>/`` whose ``adapter_config.json`` says ``"task_type": "SEQ_CLS"``
(LoRA or DoRA saved by ``save_pretrained``, trained classifier in ``modules_to_save``;
``exporters/train_peft.py``) is measured as a board serves it: each packet below is signed the
way ``solar-edge compress`` signs (its metadata, its head / bias / magnitude extras, its canary
digest), applied to one real :class:`~solar_edge.runtime.engine.EdgeRuntime` on the bundle,
and its own head's predictions are scored. Bytes are ``len`` of the signed packet.

Texts, from the task's real splits (:mod:`solar_edge.exporters.tasks`): the test split in a fixed
seeded order (the split is sorted by text, and its prefix is skewed by label); validation =
the first ``--val`` texts, report = the next ``--max-eval`` (never used to choose anything).
Calibration = ``--calib-texts`` evenly spaced training texts, unlabelled, written to
``<out dir>/calib/<task>.txt``; validation to ``<task>.val.jsonl`` (label names).

Families (``family`` in the JSON):

* ``reference``: the uncompressed adapter as a lossless packet (float32 factors and extras);
  also the size of its ``adapter_model.safetensors``;
* ``lora-int``: the adapter's own factors at int8 / int4 / int3 (group-64 scales); ``rank``:
  rank-k re-truncation (k = 1, 2, 4 and the adapter's rank) with int4 / int8 factors;
* ``data-free``: ``compress_adapter(CompressOptions(budget=B))`` at every baseline's bytes and
  on a doubling ladder, and ``max-drop`` (``max_drop``, ``eval_data`` = validation); at the
  baselines' bytes also ``no-cover`` (``cover=False``: the allocation may leave layers out)
  and, with ``--quant-weights``, ``qG`` (``quant_weight=G``: quantisation error weighed G);
* ``calibrated``: ``max_drop`` with ``calib_data`` and ``eval_data``, and the command line's
  defaults for calibration data (``compress_cli._defaults``: metric fisher, refit 120 steps);
  ``--curve`` adds it at fixed budgets (1/6, 1/3, 2/3 of the best baseline's bytes);
* ``head-only`` (``seqcls-head-only`` folders: the base model with a trained head): a packet of
  the float32 head alone, the base line.

Per packet: bytes, validation and report accuracy (Wilson 95% CI), agreement of its report
predictions with the reference packet's, calibration texts used, CPU seconds to build it
(``time.process_time``; for max-drop including its search). Per adapter also its accuracy in
torch (PEFT, ``solar-edge eval``'s torch side) on the report texts. Summary, tables and plot:
``rd_served_report.py``. Points are cached in ``<out>.cache.json`` keyed by adapter file
hash, bundle, split sizes and method.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rd_served_report as report
from rd_eval import wilson
from rd_packets import file_hash

from solar_edge.encode.baselines import plain_baselines
from solar_edge.errors import BudgetError
from solar_edge.exporters.compress import (
    CompressOptions,
    compress_adapter,
    prepare_adapter,
    sign_packet,
)
from solar_edge.exporters.compress_cli import _defaults as cli_defaults
from solar_edge.exporters.compress_measure import lossless_records
from solar_edge.exporters.target_search import BoardMeter
from solar_edge.format.bundle import Bundle, load_bundle
from solar_edge.methods.base import Adapter, Extras
from solar_edge.methods.peft_files import read_adapter

HEAD_FILE = "head.safetensors"  # a seqcls-head-only folder (train_peft.py)
SPLIT_SEED = 0
CURVE_FRACS = (1 / 6, 1 / 3, 2 / 3)
NO_REFIT = "no refit"  # setting suffix of the calibrated search without the refit
SEARCH_REVISION = 2  # --max-drop searches: 2 = the plain baselines measured beside the pick
REFERENCES = ("reference", "head-only")  # what the other packets of an adapter are held to
CHOSEN_ON_LOST = (*REFERENCES, "lora-int", "rank")  # need val_lost when cached


def seqcls_dirs(root: Path) -> list[Path]:
    """``root/<task>/<kind>/`` folders of SEQ_CLS adapters and of head-only references."""
    found = []
    for d in sorted(p for p in root.glob("*/*") if p.is_dir()):
        config = d / "adapter_config.json"
        if config.is_file() and json.loads(config.read_text()).get("task_type") == "SEQ_CLS":
            found.append(d)
        elif (d / HEAD_FILE).is_file() and (d / "config.json").is_file():
            found.append(d)
    return found


@dataclass(frozen=True)
class Splits:
    val_texts: list[str]
    val_labels: np.ndarray
    texts: list[str]             # the report split
    labels: np.ndarray
    calib: Path                  # unlabelled training texts, one per line
    val_file: Path               # validation as .jsonl (label names)


def task_splits(task: Any, folder: Path, n_val: int, n_eval: int | None, n_calib: int) -> Splits:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(task.test))
    val, rep = order[:n_val], order[n_val:] if n_eval is None else order[n_val:n_val + n_eval]
    cal = np.unique(np.linspace(0, len(task.train) - 1, min(n_calib, len(task.train))).round())
    folder.mkdir(parents=True, exist_ok=True)
    calib, val_file = folder / f"{task.name}.txt", folder / f"{task.name}.val.jsonl"
    calib.write_text("".join(task.train.texts[int(i)] + "\n" for i in cal))
    val_file.write_text("".join(json.dumps({"text": task.test.texts[i],
                                            "label": task.label_names[task.test.labels[i]]})
                                + "\n" for i in val))
    pick = lambda idx: ([task.test.texts[i] for i in idx],  # noqa: E731
                        np.asarray([task.test.labels[i] for i in idx]))
    return Splits(*pick(val), *pick(rep), calib, val_file)


class ServedMeter:
    """One runtime per task (trusting a throwaway key that signs every packet): a packet's
    predictions on the validation and report texts, fed in length order (less padding)."""

    def __init__(self, bundle_dir: str, splits: Splits) -> None:
        texts = splits.val_texts + splits.texts
        self.order = np.argsort([len(t) for t in texts], kind="stable")
        self.meter = BoardMeter(bundle_dir, [texts[i] for i in self.order], None)
        self.key, self.n_val = self.meter.key, len(splits.val_texts)

    def predict(self, packet: bytes) -> tuple[np.ndarray, np.ndarray]:
        preds = np.empty(len(self.order), np.int64)
        preds[self.order] = self.meter.measure(packet).predictions
        return preds[:self.n_val], preds[self.n_val:]


def head_only_adapter(adir: Path) -> Adapter:
    """A ``seqcls-head-only`` folder as an adapter with no layer updates: its classifier
    (``classifier_module(model).state_dict()``) as the head, labels from its config.json."""
    from safetensors.numpy import load_file

    state = load_file(str(adir / HEAD_FILE))
    return Adapter(kind="head-only", config={"task_type": "SEQ_CLS"}, task_meta={},
                   extras=Extras(head={f"classifier.{k}": v for k, v in state.items()}),
                   model_config=json.loads((adir / "config.json").read_text()))


def torch_predictions(adir: Path, adapter: Adapter, bundle: Bundle, texts: list[str]
                      ) -> np.ndarray:
    """The adapter in torch (PEFT on AutoModelForSequenceClassification, as ``solar-edge
    eval``), or for a head-only folder the base model with its trained classifier."""
    from solar_edge.exporters.eval_cmd import base_model_dir, torch_outputs

    base = base_model_dir(bundle, None)
    order = np.argsort([len(t) for t in texts], kind="stable")
    sorted_texts = [texts[i] for i in order]
    if adapter.kind != "head-only":
        logits = torch_outputs(adir, adapter, bundle, base, sorted_texts)[0]
    else:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from solar_edge.exporters.eval_cmd import BATCH, MAX_LEN
        from solar_edge.exporters.families.text_encoder import quiet_loading

        state = load_file(str(adir / HEAD_FILE))
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(str(base))
            model = AutoModelForSequenceClassification.from_pretrained(
                str(base), num_labels=int(state["weight"].shape[0])).eval()
        model.classifier.load_state_dict(state)
        with torch.no_grad():
            logits = np.concatenate([model(**tok(sorted_texts[s:s + BATCH], truncation=True,
                                                 max_length=MAX_LEN, padding=True,
                                                 return_tensors="pt")).logits.numpy()
                                     for s in range(0, len(texts), BATCH)])
    preds = np.empty(len(texts), np.int64)
    preds[order] = logits.argmax(-1)
    return preds


def scores(prefix: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    correct = int((preds == labels).sum())
    acc, lo, hi = wilson(correct, len(labels))
    return {f"{prefix}accuracy": acc, f"{prefix}ci95": [lo, hi], f"{prefix}correct": correct,
            f"{prefix}n": len(labels)}


class ServedBench:
    """Every packet of one adapter, measured on one task's :class:`ServedMeter`."""

    def __init__(self, name: str, adir: Path, adapter: Adapter, weights: Path, bundle: Bundle,
                 meter: ServedMeter, splits: Splits, cache: dict, args: Any) -> None:
        self.name, self.adir, self.adapter, self.bundle = name, adir, adapter, bundle
        self.meter, self.splits, self.cache, self.args = meter, splits, cache, args
        self.prep = prepare_adapter(adapter, bundle)
        self.aid = name.replace("/", ".")
        self.weights = weights
        self.tag = (f"{name}|{file_hash(weights)}|{bundle.fingerprint.hex()[:12]}|"
                    f"val={len(splits.val_texts)}|n={len(splits.texts)}|calib={args.calib_texts}")
        self.rows: list[dict] = []
        self.ref_val: np.ndarray | None = None  # the reference's validation predictions
        self.save: Callable[[], object] = lambda: None

    def point(self, family: str, setting: str, build: Callable[[], tuple[bytes, dict]],
              revision: str = "") -> dict:
        """Build the packet (CPU seconds), serve it, score it; cached (``revision``: part of
        the key, for a method whose code changed under the same setting)."""
        key = f"{self.tag}|{family}|{setting}{revision}"
        row = self.cache.get(key)
        is_ref = family in REFERENCES
        if row is not None and family in CHOSEN_ON_LOST and (
                "val_lost" not in row or (is_ref and "val_predictions" not in row)):
            row = None  # cached before the lost-text criterion: measure again (cheap)
        if row is None:
            cpu = time.process_time()
            try:
                data, extra = build()
            except BudgetError as exc:
                row = {"family": family, "setting": setting, "error": str(exc)}
            else:
                cpu = time.process_time() - cpu
                if self.args.packets:
                    folder = Path(self.args.packets) / self.aid
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{family}.{setting.replace(' ', '_')}.slr").write_bytes(data)
                val, rep = self.meter.predict(data)
                if is_ref:
                    self.ref_val = val
                row = {"family": family, "setting": setting, "bytes": len(data),
                       "val_lost": self.val_lost(val),
                       "cpu_s": round(cpu, 1), **extra,
                       **scores("val_", val, self.splits.val_labels),
                       **scores("", rep, self.splits.labels),
                       "predictions": rep.tolist(),
                       **({"val_predictions": val.tolist()} if is_ref else {})}
            self.cache[key] = row
            self.save()
        if is_ref and "val_predictions" in row:  # measured now or cached
            self.ref_val = np.asarray(row["val_predictions"])
        self.rows = [r for r in self.rows if (r["family"], r["setting"]) != (family, setting)]
        self.rows.append(row)
        print("  " + report.point_line(row), flush=True)
        return row

    def val_lost(self, val: np.ndarray) -> float | None:
        """Points of validation texts the reference packet gets right and this one wrong:
        ``compress --max-drop``'s criterion, so baselines are chosen as the codec is."""
        if self.ref_val is None:
            return None
        y = self.splits.val_labels
        return float(100 * np.mean((self.ref_val == y) & (val != y)))

    def sign(self, records: list) -> bytes:
        return sign_packet(self.prep, records, self.meter.key, self.aid,
                           self.meter.meter.next_version())[0]

    def reference(self, family: str = "reference") -> dict:
        return self.point(family, "lossless fp32", lambda: (
            self.sign(lossless_records(self.prep)), {"file_bytes": self.weights.stat().st_size}))

    def torch(self) -> dict:
        key = f"{self.tag}|torch"
        if key not in self.cache:
            preds = torch_predictions(self.adir, self.adapter, self.bundle, self.splits.texts)
            self.cache[key] = {**scores("", preds, self.splits.labels),
                               "predictions": preds.tolist()}
            self.save()
        return self.cache[key]

    def baselines(self) -> None:
        """The plain baselines (:mod:`solar_edge.encode.baselines`), which ``compress
        --max-drop`` also measures beside its own pick."""
        updates, extras = self.prep.updates, self.prep.extras.records
        for name, records in plain_baselines(updates, {lid: self.bundle.layer_basis(lid)
                                                       for lid in updates}):
            family, setting = (("lora-int", name[4:]) if name.startswith("own-")
                               else ("rank", name))
            self.point(family, setting, lambda r=records: (self.sign(r + extras), {}))

    def compress(self, family: str, setting: str, options: CompressOptions) -> dict:
        def build() -> tuple[bytes, dict]:
            res = compress_adapter(self.adir, self.bundle, self.meter.key, options,
                                   adapter_id=self.aid, version=self.meter.meter.next_version())
            extra: dict[str, Any] = {"budget": options.budget, "metric": options.metric,
                                     "refit_steps": options.refit_steps,
                                     "refit_texts": res.refit_texts,
                                     "calibration": res.calibration}
            if options.metric != "fro" and options.calib_data is not None:
                extra["fisher_texts"] = min(options.calib, self.args.calib_texts)
            if res.curve is not None:
                extra["search"] = res.curve
            return res.data, extra
        revision = (f"|search={SEARCH_REVISION}|refit={options.refit_steps}"
                    if options.max_drop is not None else "")
        return self.point(family, setting, build, revision)

    def datafree(self) -> None:
        """At each baseline's bytes (the data-free check) and on a doubling ladder."""
        sizes = sorted({r["bytes"] for r in self.rows
                        if r["family"] in report.BASELINES and "bytes" in r})
        ladder = [2 ** k for k in range(10, 24) if sizes[0] / 2 <= 2 ** k <= sizes[-1]
                  and all(abs(2 ** k - s) > 0.15 * s for s in sizes)]
        for budget in sorted(set(sizes) | set(ladder)):
            self.compress("data-free", f"budget {budget}", CompressOptions(budget=budget))
        for budget in sizes:  # the allocation that may leave layers out, for comparison
            self.compress("data-free", f"budget {budget} {report.NO_COVER}",
                          CompressOptions(budget=budget, cover=False))
            for g in getattr(self.args, "quant_weights", None) or ():
                self.compress("data-free", f"budget {budget} {report.quant_suffix(g)}",
                              CompressOptions(budget=budget, quant_weight=g))
        self.compress("data-free", f"max-drop {self.args.max_drop:g}", CompressOptions(
            max_drop=self.args.max_drop, eval_data=self.splits.val_file))

    def calibrated(self, curve: bool) -> None:
        metric, refit, _ = cli_defaults(None, None, self.splits.calib, False, None)
        data = {"calib_data": self.splits.calib, "metric": metric,
                "refit_steps": self.args.refit_steps if refit else 0}
        default_refit = cli_defaults(None, None, self.splits.calib, False, None,
                                     max_drop=self.args.max_drop)[1]
        # The search with and without the refit (what the refit adds); the command line's
        # default for --max-drop is marked ``cli_default``.
        for refit_steps, suffix in ((data["refit_steps"], ""), (0, f" {NO_REFIT}")):
            row = self.compress("calibrated", f"max-drop {self.args.max_drop:g}{suffix}",
                                CompressOptions(max_drop=self.args.max_drop,
                                                eval_data=self.splits.val_file,
                                                **{**data, "refit_steps": refit_steps}))
            row["cli_default"] = (refit_steps > 0) == (default_refit > 0)
            if not data["refit_steps"]:
                break
        best = report.best_baseline(self.rows, self.args.max_drop)
        for frac in CURVE_FRACS if curve and best else ():
            budget = int(frac * best["bytes"])
            self.compress("calibrated", f"budget {budget}", CompressOptions(budget=budget,
                                                                           **data))


def add_quant_weights_option(parser: Any) -> None:
    """``--quant-weights G,...``: data-free variants at every baseline's bytes (``qG``)."""
    parser.add_argument("--quant-weights", type=lambda v: [float(x) for x in v.split(",")],
                        default=None, help="also data-free at each baseline's bytes with the "
                        "quantisation error weighed by each of these (comma separated)")


def run(args: Any, dirs: list[Path], out: Path) -> int:
    """The served benchmark over ``dirs`` (SEQ_CLS adapters and head-only references)."""
    from solar_edge.exporters.tasks import load_task

    started = time.perf_counter()
    bundle = load_bundle(args.bundle)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_suffix(".cache.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    results: dict[str, dict] = {}
    by_task: dict[str, list[Path]] = {}
    for d in dirs:
        metrics = d / "metrics.json"
        task_name = (json.loads(metrics.read_text()).get("task") if metrics.is_file()
                     else None) or d.parent.name
        by_task.setdefault(task_name, []).append(d)
    for task_name, adirs in by_task.items():
        task = load_task(task_name)
        splits = task_splits(task, out.parent / "calib", args.val, args.max_eval,
                             args.calib_texts)
        meter = ServedMeter(str(bundle.root), splits)
        for adir in adirs:
            name = f"{task_name}/{adir.name}"
            head_only = (adir / HEAD_FILE).is_file()
            adapter = head_only_adapter(adir) if head_only else read_adapter(adir)
            if adapter.labels != list(task.label_names):
                raise SystemExit(f"{name}: labels {adapter.labels} are not the task's "
                                 f"{list(task.label_names)}")
            weights = adir / (HEAD_FILE if head_only else "adapter_model.safetensors")
            print(f"{name}: validation {len(splits.val_texts)}, report {len(splits.texts)}, "
                  f"calibration {args.calib_texts} texts", flush=True)
            b = ServedBench(name, adir, adapter, weights, bundle, meter, splits, cache, args)
            b.save = lambda: cache_path.write_text(json.dumps(cache))
            b.reference("head-only" if head_only else "reference")
            torch_row = b.torch()
            if not head_only:
                b.baselines()
                b.datafree()
                b.calibrated(args.curve)
            results[name] = report.adapter_result(b.rows, torch_row, head_only, args.max_drop,
                                                  list(splits.labels))
            report.write(out, bundle, args, results, time.perf_counter() - started)
    print(report.markdown(results, args.max_drop))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0
