"""One adapter's measured points for the rate-distortion benchmark (``bench/rd.py``).

:class:`AdapterBench` runs every method family on one adapter: it builds each packet, decodes
it, measures bytes, errors and (through :class:`rd_eval.PatchedEvaluator`) held-out accuracy
and prediction agreement, caches each point, and walks each family's budgets from the
smallest packet up (``ladder``). Calibration and refit run the bundle's base model in torch,
opened once per run by the caller and passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rd_eval import PatchedEvaluator
from rd_packets import (
    RANDOM_SEED,
    Factors,
    PacketMaker,
    Updates,
    errors_of,
    file_hash,
    lora_int_records,
    random_bases,
    safetensors_bytes,
)
from rd_report import BASELINE_FAMILIES, TOLERANCE

from solar_edge.encode.allocate import (
    Allocation,
    AllocConfig,
    allocation_for_budget,
    layer_options,
)
from solar_edge.encode.solar import CodecConfig, encode
from solar_edge.errors import BudgetError
from solar_edge.exporters.calibration import Head, calibration_fisher
from solar_edge.exporters.families import TorchModel
from solar_edge.exporters.heads import head_for
from solar_edge.exporters.refit import RefitConfig, refit_records
from solar_edge.format.bundle import Bundle, LayerBasis
from solar_edge.format.records import CodecHeader, LayerRecord, ValueFormat
from solar_edge.methods.matching import match_to_bundle
from solar_edge.methods.peft_files import read_adapter
from solar_edge.methods.tinylora import core_records
from solar_edge.methods.vera import carry as vera_carry


class AdapterBench:
    """Every method's points for one adapter (``ADAPTERS/<task>/<kind>/``).

    ``model`` is the bundle's base model in torch (opened once per run); ``grams`` its
    calibration input Grams of every bundle layer (weights of the activation error)."""

    def __init__(self, name: str, adir: Path, bundle: Bundle, model: TorchModel,
                 evaluator: PatchedEvaluator, grams: dict[int, np.ndarray], cache: dict, key,
                 n_eval: int) -> None:
        self.name, self.adir, self.bundle, self.model = name, adir, bundle, model
        self.adapter = read_adapter(adir)
        self.updates: Updates = match_to_bundle(self.adapter.updates, bundle.layers)
        self.bases = {lid: bundle.layer_basis(lid) for lid in self.updates}
        meta = {"task": self.adapter.task_meta.get("task"),
                "labels": self.adapter.task_meta.get("labels"),
                "head_seed": self.adapter.task_meta.get("head_seed")}
        self.maker = PacketMaker(bundle, name.replace("/", "."), meta, key)
        self._head = head_for(self.adapter.task_meta, model.hidden_size)
        self.evaluator, self.grams, self.cache = evaluator, grams, cache
        self.tag = f"{name}|{file_hash(adir / 'adapter_model.safetensors')}|n={n_eval}"
        self.points: list[dict] = []
        self.save: Callable[[], None] = lambda: None
        self.reference_accuracy = 0.0
        self.calib_texts: list[str] = []
        self.calib_labels: list[int] = []
        self.ablation = True
        self.sparse_fracs: tuple[float, ...] = (0.25, 0.5)
        self.refit_texts: list[str] = []
        self.reference_predictions: np.ndarray | None = None  # for prediction agreement
        self._options: dict[str, dict] = {}

    def point(self, family: str, setting: str, build: Callable[[], tuple[int, Factors, dict]],
              evaluate: bool = True) -> dict:
        """Build the packet, measure bytes and errors, and (if asked) accuracy; cached."""
        key = f"{self.tag}|{family}|{setting}"
        row = self.cache.get(key)
        if row is None or (evaluate and "accuracy" not in row):
            started = time.perf_counter()
            nbytes, factors, extra = build()
            row = {"family": family, "setting": setting, "bytes": nbytes,
                   **errors_of(self.updates, factors, self.grams), **extra}
            if evaluate:
                dws = {lid: (L @ Rt.T).astype(np.float32) for lid, (L, Rt) in factors.items()
                       if L.shape[1]}
                row.update(self.evaluator.accuracy(dws).as_dict())
                preds = self.evaluator.last_predictions
                if family == "reference":
                    self.reference_predictions = preds.copy()
                elif self.reference_predictions is not None:
                    row["agreement"] = float((preds == self.reference_predictions).mean())
            row["seconds"] = round(time.perf_counter() - started, 2)
            self.cache[key] = row
            self.save()
        row = dict(row)
        self.points = [p for p in self.points if (p["family"], p["setting"]) != (family, setting)]
        self.points.append(row)
        acc = f"{100 * row['accuracy']:5.1f}%" if "accuracy" in row else "   -  "
        print(f"  {family:<13} {setting:<22} {row['bytes']:>9} B  acc {acc}  "
              f"fro {row['rel_fro']:.3f}  act {row['act_err']:.3f}", flush=True)
        return row

    def ladder(self, family: str, items: list[tuple[str, Callable[[], tuple]]]) -> None:
        """Measure every point's bytes and errors, then evaluate accuracy from the smallest
        packet up, stopping at the first one within the tolerance of the reference (larger
        points of the family are kept without accuracy: a smaller one already met the bar)."""
        floor = self.reference_accuracy - TOLERANCE
        rows = [(self.point(family, setting, build, evaluate=False), setting, build)
                for setting, build in items]
        for _row, setting, build in sorted(rows, key=lambda t: t[0]["bytes"]):
            if self.point(family, setting, build)["accuracy"] >= floor - 1e-12:
                break

    def _encode(self, cfg: CodecConfig, bases: dict[int, LayerBasis]) -> tuple[int, Factors, dict]:
        res = encode(self.updates, bases, cfg)
        nbytes, factors = self.maker.roundtrip(res.header, res.records, bases)
        return nbytes, factors, {"records": len(res.records)}

    def reference(self) -> None:
        """The uncompressed adapter (its safetensors bytes) and its tensors as fp16."""
        path = self.adir / "adapter_model.safetensors"
        exact = {lid: (u.B, u.A.T) for lid, u in self.updates.items()}
        ref = self.point("reference", "fp32", lambda: (path.stat().st_size, exact, {}))
        self.reference_accuracy = ref["accuracy"]
        if self.reference_predictions is None:  # cached reference: predict once more
            self.evaluator.accuracy({lid: (u.B @ u.A).astype(np.float32)
                                     for lid, u in self.updates.items()})
            self.reference_predictions = self.evaluator.last_predictions.copy()

        def fp16() -> tuple[int, Factors, dict]:
            f = {lid: (u.B.astype(np.float16).astype(np.float32),
                       u.A.T.astype(np.float16).astype(np.float32))
                 for lid, u in self.updates.items()}
            return safetensors_bytes(path, "float16"), f, {}

        self.point("lora-fp16", "safetensors", fp16)

    def baselines(self) -> None:
        """The adapter's factors quantised, rank re-truncation, and sparse-basis baselines."""
        codec = CodecHeader(seed=0)
        self.ladder("lora-int", [
            (f"{fmt.name.lower()}+zstd", lambda fmt=fmt: (
                *self.maker.roundtrip(codec, lora_int_records(self.updates, fmt), {}), {}))
            for fmt in (ValueFormat.INT8, ValueFormat.INT4, ValueFormat.INT3)])
        items = []
        for k, fmt in ((1, ValueFormat.INT8), (1, ValueFormat.INT4), (2, ValueFormat.INT4),
                       (2, ValueFormat.INT8), (3, ValueFormat.INT4), (4, ValueFormat.INT3),
                       (4, ValueFormat.INT4), (8, ValueFormat.INT4)):
            cfg = CodecConfig(representation="dense_factors", max_rank=k, value_format=fmt,
                              overhead_bytes=self.maker.overhead)
            items.append((f"r{k}-{fmt.name.lower()}",
                          lambda cfg=cfg: self._encode(cfg, self.bases)))
        self.ladder("rank", items)
        fp16 = safetensors_bytes(self.adir / "adapter_model.safetensors", "float16")
        rnd = random_bases(self.updates, RANDOM_SEED)
        for family, bases in (("random-basis", rnd), ("naive-solar", self.bases)):
            items = []
            for frac in self.sparse_fracs:
                cfg = CodecConfig(representation="sparse_core", value_format=ValueFormat.INT8,
                                  budget_bytes=int(frac * fp16),
                                  overhead_bytes=self.maker.overhead)
                items.append((f"sparse {frac:g}x fp16" + (" qr" if family[0] == "r" else ""),
                              lambda cfg=cfg, bases=bases: self._encode(cfg, bases)))
            self.ladder(family, items)

    def best_baseline_bytes(self) -> int:
        """Smallest baseline packet within the tolerance (else the largest rank packet)."""
        floor = self.reference_accuracy - TOLERANCE
        ok = [p["bytes"] for p in self.points
              if p["family"] in BASELINE_FAMILIES and p.get("accuracy", -1) >= floor - 1e-12]
        return min(ok) if ok else max(p["bytes"] for p in self.points if p["family"] == "rank")

    def codecs(self, fracs: tuple[float, ...]) -> None:
        """Codec points at budgets that are fractions of the best baseline's bytes."""
        r1 = {"bytes": self.best_baseline_bytes()}
        items = []
        for frac in (0.5, 1.0):
            cfg = CodecConfig(representation="auto", value_format=ValueFormat.INT4,
                              budget_bytes=int(frac * r1["bytes"]),
                              overhead_bytes=self.maker.overhead)
            items.append((f"auto-int4 {frac:g}x base", lambda cfg=cfg: self._try(cfg)))
        self.ladder("codec", items)
        tag = f" rmax{self.alloc_config.max_rank}" if self.alloc_config.max_rank != 4 else ""
        base = self.best_baseline_bytes()

        def ours(frac: float, key: str) -> tuple[int, Factors, dict]:
            return self._allocated(self._allocation(key, int(frac * base)))

        self.ladder("fisher", [(f"{frac:g}x base {base}{tag}",
                                lambda f=frac: ours(f, "fisher")) for frac in fracs])
        if not self.ablation:
            return
        self.ladder("actaware", [(f"{frac:g}x base {base}", lambda f=frac: ours(f, "act"))
                                 for frac in fracs])
        self.ladder("frobenius", [(f"{frac:g}x base {base}", lambda f=frac: ours(f, "fro"))
                                  for frac in fracs])

    def refits(self, fracs: tuple[float, ...], config: RefitConfig) -> None:
        """K-FAC allocation + output-matching refit (:mod:`solar_edge.exporters.refit`) at
        budgets that are fractions of the best baseline's bytes, smallest first, stopping at
        the first packet within the tolerance (each point costs a refit, so none is built
        past it)."""
        base = self.best_baseline_bytes()
        floor = self.reference_accuracy - TOLERANCE
        tag = f" rmax{self.alloc_config.max_rank}" if self.alloc_config.max_rank != 4 else ""
        for frac in sorted(fracs):
            def build(frac: float = frac) -> tuple[int, Factors, dict]:
                alloc = self._allocation("fisher", int(frac * base))
                alloc.records, extra = self._refitted(alloc.records, config)
                nbytes, factors, more = self._allocated(alloc)
                return nbytes, factors, {**more, **extra}
            try:
                row = self.point("refit", f"{frac:g}x base {base}{tag} s{config.steps}", build)
            except BudgetError:
                continue
            if row["accuracy"] >= floor - 1e-12:
                break
        if self.ablation:  # how much of the gain is the refit alone: rank-k int4 + refit
            for k in (1, 2):
                cfg = CodecConfig(representation="dense_factors", max_rank=k,
                                  value_format=ValueFormat.INT4,
                                  overhead_bytes=self.maker.overhead)

                def rank_build(cfg: CodecConfig = cfg) -> tuple[int, Factors, dict]:
                    res = encode(self.updates, self.bases, cfg)
                    records, extra = self._refitted(res.records, config)
                    nbytes, factors = self.maker.roundtrip(res.header, records, self.bases)
                    return nbytes, factors, extra
                self.point("rank+refit", f"r{k}-int4 s{config.steps}", rank_build)

    @property
    def head(self) -> Head:
        """The adapter's task head in torch (features -> logits), from its task.json."""
        if self._head is None:
            raise ValueError(f"{self.name}: task.json has no labels/head_seed (no task head)")
        return self._head

    def _refitted(self, records: list[LayerRecord],
                  config: RefitConfig) -> tuple[list[LayerRecord], dict]:
        started = time.perf_counter()
        rep = refit_records(self.model, self.bundle, records, self.updates, self.bases,
                            self.refit_texts, self.head, config=config)
        return rep.records, {"refit_loss": [rep.loss_before, rep.loss_after],
                             "refit_steps": rep.steps, "refit_texts": len(self.refit_texts),
                             "refit_seconds": round(time.perf_counter() - started, 1)}

    @property
    def alloc_config(self) -> AllocConfig:
        rank = max(u.B.shape[1] for u in self.updates.values())
        return AllocConfig(max_rank=min(16, rank), overhead_bytes=self.maker.overhead)

    def _allocation(self, key: str, budget: int) -> Allocation:
        """The allocator's records at ``budget`` for distortion ``key`` (fisher/act/fro)."""
        if key not in self._options:
            grams, out_grams = ({}, None) if key == "fro" else (self.grams, None)
            if key == "fisher":
                grams, out_grams = self.fisher()
            self._options[key] = layer_options(self.updates, self.bases, grams,
                                               self.alloc_config, out_grams)
        return allocation_for_budget(self._options[key], budget, self.maker.overhead)

    def _allocated(self, alloc: Allocation) -> tuple[int, Factors, dict]:
        nbytes, factors = self.maker.roundtrip(CodecHeader(seed=0), alloc.records, self.bases)
        kinds = [r.kind.name for r in alloc.records]
        return nbytes, factors, {
            "records": len(alloc.records), "predicted_error": alloc.total_error,
            "basis_records": kinds.count("FACTORED_CORE"),
            "layers": {str(lid): [f.rank, f.bits] for lid, f in alloc.chosen.items()}}

    def fisher(self) -> tuple[dict, dict]:
        """K-FAC input/output Grams at the adapted model on labelled calibration texts."""
        dense = {lid: u.B @ u.A for lid, u in self.updates.items()}
        out = calibration_fisher(self.model, self.bundle, self.calib_texts, self.calib_labels,
                                 dense, self.head)
        self.model.module.zero_grad(set_to_none=True)  # its last backward's parameter grads
        return out

    def _try(self, cfg: CodecConfig) -> tuple[int, Factors, dict]:
        try:
            return self._encode(cfg, self.bases)
        except BudgetError:
            return self.maker.overhead, {}, {"note": "budget too small"}

    def carry_vera(self) -> None:
        """VeRA's scaling vectors as VERA_SCALES records (projections regenerated on device)."""
        for fmt in (ValueFormat.FLOAT32, ValueFormat.FLOAT16):
            recs = vera_carry(self.adapter, self.updates, None, fmt)
            self.point("carry", f"vera scales {fmt.name.lower()}", lambda recs=recs: (
                *self.maker.roundtrip(CodecHeader(seed=0), recs, {}), {}))

    def carry(self, r: int) -> None:
        """LoRA-XS / TinyLoRA ``r x r`` cores in the bundle basis (float32 and float16)."""
        for fmt in (ValueFormat.FLOAT32, ValueFormat.FLOAT16):
            recs = core_records(self.updates, self.bases, r, fmt)
            self.point("carry", f"core {r}x{r} {fmt.name.lower()}", lambda recs=recs: (
                *self.maker.roundtrip(CodecHeader(seed=0), recs, self.bases), {}))
