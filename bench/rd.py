"""Rate-distortion of real adapters: accuracy and errors versus signed packet bytes, one run.

    python bench/rd.py --bundle artifacts/bundle-x86-64 --adapters artifacts/adapters \
        --out out/rd.json [--max-eval 1000] [--only pydoc-topics/lora-qv-r8 ...]

For every adapter directory ``ADAPTERS/<task>/<kind>/`` (trained by
``scripts/train_adapters.py``) and every method below, it builds the real signed packet
(``encode_packet``: header, layer table, positions, values, zstd when smaller, Ed25519
signature), measures ``len(bytes)``, decodes the packet back, and measures on what the
device would reconstruct: held-out accuracy (Wilson 95% CI) of the MiniLM ONNX graph with
``W0 + dW_hat`` patched in, the relative Frobenius error and the activation-weighted error
``sqrt(sum_l tr(E_l G_l E_l^T) / sum_l tr(dW_l G_l dW_l^T))`` (``G_l``: input Gram of layer
``l`` on calibration texts from the training split, base model).

Methods (``family`` in the JSON):

* ``reference``: the uncompressed adapter (fp32 factors; bytes = its safetensors file);
  ``lora-fp16``: its tensors as fp16 safetensors (bytes of that file).
* ``lora-int``: the adapter's own factors as DENSE_FACTORS records, int8 / int4 / int3 with
  group-64 float16 scales (+zstd when smaller).
* ``rank``: rank-k re-truncation of dW (SVD of the factors) with int8 / int4 factors
  (``codec.encode`` with ``dense_factors``, quantisation-aware refit).
* ``random-basis``: NOLA-style sparse coefficients in a seeded random basis (Rademacher
  columns from the project's Philox PRNG), global byte budget.
* ``naive-solar``: sparse coefficients in W0's singular basis (the paper's idea alone).
* ``codec``: ``codec.encode`` (representation ``auto``, int4) at several budgets.
* ``fisher``: the same allocator with the K-FAC distortion ``tr(Gamma E G E^T)``
  (:func:`solar_edge.exporters.calibration.calibration_fisher`, labelled calibration texts);
* ``refit``: the ``fisher`` allocation, then the output-matching refit of its record values
  (:mod:`solar_edge.exporters.refit`: same records and bytes, values tuned so the model's
  outputs match the uncompressed adapter's on the unlabelled training texts);
* ``rank+refit`` (``--ablation``): the rank-1/2 int4 baseline's records put through the
  same refit, to separate what the refit and the allocation each contribute;
* ``actaware``: :mod:`solar_edge.encode.allocate` (activation-aware fits, int2..int8, rank 0..4
  per layer, plain or W0-basis coordinates, global allocation) at several budgets;
  ``frobenius``: the same allocator with ``G = I`` (ablation).
* ``carry``: training-time relatives carried coefficient-only in the bundle basis
  (LoRA-XS cores, TinyLoRA 2x2 cores; float32 and float16 values). VeRA cannot be carried
  that way (its projections come from torch's generator, not the device PRNG), so it is
  compressed like the LoRA kinds: its ``dW`` through every baseline and codec above.

Points are cached in ``<out>.cache.json`` (keyed by adapter file hash, method, held-out size),
so re-runs only evaluate what is new. A PNG (accuracy vs bytes, log x, one panel per
adapter) is written beside the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rd_eval import PatchedEvaluator  # noqa: E402

from solar_edge.decode import factors_by_layer
from solar_edge.encode.actaware import weighted_sq_error  # noqa: E402
from solar_edge.encode.allocate import (  # noqa: E402
    Allocation,
    AllocConfig,
    allocation_for_budget,
    layer_options,
)
from solar_edge.encode.quant import quantize  # noqa: E402
from solar_edge.encode.solar import CodecConfig, encode
from solar_edge.errors import BudgetError  # noqa: E402
from solar_edge.exporters.calibration import (  # noqa: E402
    calibration_fisher,
    calibration_grams,
)
from solar_edge.exporters.refit import RefitConfig, refit_records  # noqa: E402
from solar_edge.format import signing  # noqa: E402
from solar_edge.format.bundle import (  # noqa: E402
    Bundle,
    LayerBasis,  # noqa: E402
    load_bundle,
)
from solar_edge.format.layout import fixed_overhead_bytes
from solar_edge.format.packet import PacketHeader
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import (  # noqa: E402
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import LayerUpdate  # noqa: E402
from solar_edge.methods.matching import match_to_bundle
from solar_edge.methods.peft_files import read_adapter  # noqa: E402
from solar_edge.methods.tinylora import core_records  # noqa: E402
from solar_edge.methods.vera import carry as vera_carry  # noqa: E402
from solar_edge.regen.prng import perturbation_columns  # noqa: E402

MAIN_KINDS = ("lora-qv-r8", "lora-all-r16", "adalora", "vera")
TOLERANCE = 0.005  # "within 0.5 point of the uncompressed adapter"
LOOSE = 0.02  # a second, noise-level tolerance reported beside it
RANDOM_SEED = 7
BASELINE_FAMILIES = ("lora-fp16", "lora-int", "rank", "random-basis", "naive-solar")
CODEC_FAMILIES = ("codec", "fisher", "refit", "actaware", "frobenius", "carry")
SUMMARY_KEYS = ("family", "setting", "bytes", "accuracy", "agreement")
ABLATION_FAMILIES = ("rank+refit",)  # the refit on a baseline's records: reported, not ranked

Updates = dict[int, LayerUpdate]
Factors = dict[int, tuple[np.ndarray, np.ndarray]]


# --- packets -------------------------------------------------------------------------------


class PacketMaker:
    """Signed packets for one adapter; decodes them back into per-layer factors."""

    def __init__(self, bundle: Bundle, adapter_id: str, metadata: dict, key) -> None:
        self.header = PacketHeader(bundle.fingerprint, adapter_id, 1, metadata)
        self.overhead = fixed_overhead_bytes(adapter_id, metadata)
        self.key = key

    def roundtrip(self, codec: CodecHeader, records: list[LayerRecord],
                  bases: dict[int, LayerBasis]) -> tuple[int, Factors]:
        data = encode_packet(self.header, codec, records, self.key)
        packet = decode_packet(data, [self.key.public_key()])
        return len(data), factors_by_layer(packet.records, packet.codec, bases)


def safetensors_bytes(path: Path, dtype: str) -> int:
    """Size of the adapter's tensors saved as ``dtype`` safetensors."""
    from safetensors.numpy import load_file, save

    tensors = {k: v.astype(dtype) for k, v in load_file(str(path)).items()}
    return len(save(tensors))


def random_bases(updates: Updates, seed: int) -> dict[int, LayerBasis]:
    """Seeded random orthonormal bases: QR of Philox Rademacher columns, min(out, in) per side.

    (A raw square Rademacher matrix is badly conditioned; a device would regenerate the same
    columns and orthonormalise them. Bytes are what matter here: positions and values.)"""
    out = {}
    for lid, u in updates.items():
        n_out, n_in = u.B.shape[0], u.A.shape[1]
        r = min(n_out, n_in)
        pu = perturbation_columns(seed, lid, 0, n_out, np.arange(r), PerturbationKind.RADEMACHER)
        pv = perturbation_columns(seed, lid, 1, n_in, np.arange(r), PerturbationKind.RADEMACHER)
        out[lid] = LayerBasis(lid, np.linalg.qr(pu.astype(np.float64))[0].astype(np.float32),
                              np.linalg.qr(pv.astype(np.float64))[0].astype(np.float32))
    return out


def lora_int_records(updates: Updates, fmt: ValueFormat) -> list[LayerRecord]:
    """The adapter's own factors (``dW = B @ A``) as DENSE_FACTORS records."""
    recs = []
    for lid, u in sorted(updates.items()):
        vals = np.concatenate([u.B.reshape(-1), u.A.T.reshape(-1)])
        recs.append(LayerRecord(lid, RecordKind.DENSE_FACTORS, u.B.shape[0], u.A.shape[1],
                                u.B.shape[1], quantize(vals, fmt, 64)))
    return recs


# --- errors --------------------------------------------------------------------------------


def errors_of(updates: Updates, factors: Factors, grams: dict[int, np.ndarray]) -> dict:
    fro = [0.0, 0.0]
    act = [0.0, 0.0]
    for lid, u in updates.items():
        B, A = u.B.astype(np.float64), u.A.astype(np.float64)
        n_out, n_in = B.shape[0], A.shape[1]
        L, Rt = factors.get(lid, (np.zeros((n_out, 0)), np.zeros((n_in, 0))))
        L, Rt = L.astype(np.float64), Rt.astype(np.float64)
        eye = np.eye(n_in)
        fro[0] += weighted_sq_error(B, A, L, Rt, eye)
        fro[1] += weighted_sq_error(B, A, np.zeros((n_out, 0)), np.zeros((n_in, 0)), eye)
        g = grams[lid]
        act[0] += weighted_sq_error(B, A, L, Rt, g)
        act[1] += weighted_sq_error(B, A, np.zeros((n_out, 0)), np.zeros((n_in, 0)), g)
    return {"rel_fro": float(np.sqrt(fro[0] / fro[1])), "act_err": float(np.sqrt(act[0] / act[1]))}


# --- one adapter ---------------------------------------------------------------------------


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class AdapterBench:
    def __init__(self, name: str, adir: Path, bundle: Bundle, evaluator: PatchedEvaluator,
                 grams: dict[int, np.ndarray], cache: dict, key, n_eval: int) -> None:
        self.name, self.adir, self.bundle = name, adir, bundle
        self.adapter = read_adapter(adir)
        self.updates: Updates = match_to_bundle(self.adapter.updates, bundle.layers)
        self.bases = {lid: bundle.layer_basis(lid) for lid in self.updates}
        meta = {"task": self.adapter.task_meta.get("task"),
                "labels": self.adapter.task_meta.get("labels"),
                "head_seed": self.adapter.task_meta.get("head_seed")}
        self.maker = PacketMaker(bundle, name.replace("/", "."), meta, key)
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

    def _refitted(self, records: list[LayerRecord],
                  config: RefitConfig) -> tuple[list[LayerRecord], dict]:
        started = time.perf_counter()
        rep = refit_records(self.bundle, records, self.updates, self.bases, self.refit_texts,
                            int(self.adapter.task_meta["head_seed"]),
                            len(self.adapter.task_meta["labels"]), config)
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
        meta = self.adapter.task_meta
        return calibration_fisher(self.bundle, self.calib_texts, self.calib_labels, dense,
                                  int(meta["head_seed"]), len(meta["labels"]))

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
        for fmt in (ValueFormat.FLOAT32, ValueFormat.FLOAT16):
            recs = core_records(self.updates, self.bases, r, fmt)
            self.point("carry", f"core {r}x{r} {fmt.name.lower()}", lambda recs=recs: (
                *self.maker.roundtrip(CodecHeader(seed=0), recs, self.bases), {}))


# --- report --------------------------------------------------------------------------------


def summarise(name: str, points: list[dict], meta: dict, tolerance: float = TOLERANCE) -> dict:
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
        ax.set_xscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("signed packet bytes")
        ax.set_ylabel("held-out accuracy %")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
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


def subset(n_total: int, n: int | None) -> np.ndarray:
    """Evenly spaced indices (the splits are sorted by text, so a prefix would be biased)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n).round().astype(int)


def main(argv: list[str] | None = None) -> int:
    from solar_edge.exporters.tasks import load_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="artifacts/bundle-x86-64")
    ap.add_argument("--adapters", default="artifacts/adapters")
    ap.add_argument("--out", default="out/rd.json")
    ap.add_argument("--max-eval", type=int, default=1000,
                    help="held-out examples per task (evenly spaced; all when fewer)")
    ap.add_argument("--calib", type=int, default=128, help="calibration texts (training split)")
    ap.add_argument("--only", nargs="*", default=None, help="task/kind names to run")
    ap.add_argument("--fracs", default="0.3,0.5,1.0",
                    help="allocator budgets as fractions of the best baseline's bytes")
    ap.add_argument("--refit-fracs", default="0.1,0.2,0.3,0.5",
                    help="refit budgets (fractions of the best baseline), smallest first")
    ap.add_argument("--refit-steps", type=int, default=RefitConfig().steps,
                    help="optimiser steps of the output-matching refit")
    ap.add_argument("--ablation", action="store_true",
                    help="also run the activation-only and Frobenius allocators, and more "
                         "sparse-basis budgets")
    ap.add_argument("--recheck", action="store_true",
                    help="rebuild and re-evaluate each adapter's smallest codec and baseline "
                         "packets within the tolerance when they lack prediction agreement")
    args = ap.parse_args(argv)

    bundle = load_bundle(args.bundle)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_suffix(".cache.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    key = signing.generate_private_key()
    fracs = tuple(float(f) for f in args.fracs.split(","))
    refit_fracs = tuple(float(f) for f in args.refit_fracs.split(","))
    dirs = sorted(p.parent for p in Path(args.adapters).glob("*/*/task.json"))
    names = [f"{d.parent.name}/{d.name}" for d in dirs]
    if args.only:
        dirs = [d for d, n in zip(dirs, names, strict=True) if n in args.only]
    previous = json.loads(out.read_text()) if out.is_file() else {}
    results: dict = previous.get("adapters", {})
    by_task: dict[str, list[Path]] = {}
    for d in dirs:
        by_task.setdefault(d.parent.name, []).append(d)
    for task_name, adirs in by_task.items():
        task = load_task(task_name)
        idx = subset(len(task.test), args.max_eval)
        cal = subset(len(task.train), args.calib)
        meta0 = json.loads((adirs[0] / "task.json").read_text())
        evaluator = PatchedEvaluator(bundle, [task.test.texts[i] for i in idx],
                                     [task.test.labels[i] for i in idx],
                                     int(meta0["head_seed"]), task.num_labels)
        grams = calibration_grams(bundle, [task.train.texts[i] for i in cal],
                                  [layer.id for layer in bundle.layers])
        for adir in adirs:
            name = f"{task_name}/{adir.name}"
            meta = json.loads((adir / "task.json").read_text())
            print(f"{name}: held-out n={len(idx)}, calibration {len(cal)} texts", flush=True)
            b = AdapterBench(name, adir, bundle, evaluator, grams, cache, key, len(idx))
            if args.recheck and name in results:
                forget_unchecked(cache, b.tag, results[name]["summary"])
            b.save = lambda: cache_path.write_text(json.dumps(cache, indent=1))
            b.ablation = args.ablation
            b.sparse_fracs = (0.25, 0.5) if args.ablation else (0.5,)
            b.calib_texts = [task.train.texts[i] for i in cal]
            b.calib_labels = [task.train.labels[i] for i in cal]
            b.refit_texts = list(task.train.texts)
            b.reference()
            kind = meta.get("adapter_kind", adir.name)
            if kind in ("lora-xs", "tinylora"):
                r = int(b.adapter.config.get("r", 2))
                b.carry(r)
            if kind == "vera":
                b.carry_vera()
            if kind in MAIN_KINDS:
                b.baselines()
                b.codecs(fracs)
                b.refits(refit_fracs, RefitConfig(steps=args.refit_steps))
            cache_path.write_text(json.dumps(cache, indent=1))
            results[name] = {"points": b.points, "summary": summarise(name, b.points, meta),
                             "held_out": len(idx), "calibration_texts": len(cal)}
            report = {"bundle": str(args.bundle), "tolerance": TOLERANCE, "adapters": results}
            out.write_text(json.dumps(report, indent=1, default=float))
    plot(results, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown_table(results))
    print("\nadapter                      ref acc  smallest codec (B)   best baseline (B)   ratio")
    for name, r in results.items():
        s = r["summary"]
        c, bl = s["smallest_codec"], s["smallest_baseline"]
        print(f"{name:<28} {100 * s['reference_accuracy']:6.1f}  "
              f"{(c['bytes'] if c else '-')!s:>10} {(c['family'] if c else ''):<9}"
              f"{(bl['bytes'] if bl else '-')!s:>10} {(bl['setting'] if bl else ''):<10}"
              f"{s['ratio'] if s['ratio'] is None else round(s['ratio'], 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

