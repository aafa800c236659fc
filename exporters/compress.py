"""A PEFT adapter directory -> one signed packet for a bundle: the compress pipeline.

``compress_adapter`` is what ``solar-edge compress`` and the demo run:

1. read the adapter and match its layers to the bundle's adaptable weights;
2. (metric ``act`` / ``fisher``) calibration statistics of the bundle's own base model on
   calibration texts (:mod:`solar_edge.exporters.calibration`);
3. one global byte allocation (:mod:`solar_edge.encode.allocate`) under a budget, or the
   smallest budget meeting an error bound;
4. (``refit_steps > 0``, budget mode) the output-matching refit of the chosen records
   (:mod:`solar_edge.exporters.refit`): same records and bytes, values tuned on unlabelled
   calibration texts;
5. sign the packet.

Calibration texts come from ``calib_data`` (a ``.txt`` or ``.jsonl`` file,
:mod:`solar_edge.exporters.calib_data`), else from the built-in task an adapter's
``task.json`` names. With ``exact=True`` steps 2-4 are replaced by carrying the adapter's
trained numbers coefficient-only (:mod:`solar_edge.encode.carry`). A missing extra, missing
calibration data or a base model that is not the bundle's is a typed error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solar_edge.encode.allocate import (
    Allocation,
    AllocConfig,
    allocation_for_budget,
    allocation_for_error,
    largest_bytes,
    layer_options,
)
from solar_edge.encode.extras import CANDIDATES as EXTRA_FORMATS
from solar_edge.encode.extras import ExtraRecords, extra_records
from solar_edge.errors import AdapterError, CalibrationError, CodecError
from solar_edge.format.bundle import Bundle
from solar_edge.format.layout import fixed_overhead_bytes
from solar_edge.format.packet import PacketHeader
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import Adapter, LayerUpdate
from solar_edge.methods.matching import MatchedExtras, match_extras, match_to_bundle
from solar_edge.methods.peft_files import read_adapter
from solar_edge.regen import canary, update_digest
from solar_edge.runtime.families.causal_lm import NAME as DECODER_FAMILY

from .adapter_checks import (
    check_head_modules,
    check_head_width,
    check_magnitudes,
    check_pooler,
    check_problem_type,
    check_task_type,
)
from .budget_fill import fill_budget
from .compress_measure import (
    eval_set,
    plain_candidates,
    served_digest,
    served_update_digest,
    smallest_within,
)
from .head_specs import base_model_type, head_spec, num_labels

METRICS = ("fro", "act", "fisher")
PACKET_METADATA_KEYS = ("task", "labels", "head_seed")
MIN_CALIBRATION_TEXTS = 8
# Data-free fits weigh what quantisation adds beyond rank truncation at one half: chosen on
# validation splits (docs/rate-distortion.md, docs/vision.md), where it kept more rank at
# fewer bits and raised the mean margin over the plain baselines on every adapter measured.
DATA_FREE_QUANT_WEIGHT = 0.5


@dataclass(frozen=True)
class CompressOptions:
    budget: int | None = None         # largest signed packet in bytes (budget_fill.py)
    max_error: float | None = None    # or: largest overall relative error in ``metric``
    max_drop: float | None = None     # or: largest measured accuracy drop, in points
    eval_data: Path | None = None     # texts (+labels) the drop is measured on
    holdout: float = 0.25             # share of calibration texts held back for it
    canary: str = "update"            # the vouch a packet carries: its decoded update's
    #                                    digest, its served outputs on the bundle's canary
    #                                    inputs ("outputs"), or nothing ("none"); CANARIES
    cover: bool = True                # data-free: leave no updated layer out when affordable
    quant_weight: float | None = None  # weight of quantisation against truncation error
    #                                    (None: DATA_FREE_QUANT_WEIGHT for metric fro, else 1)
    metric: str = "fro"
    calib: int = 64                   # calibration texts for act / fisher
    max_rank: int = 4
    refit_steps: int = 0              # output-matching refit (budget mode only)
    exact: bool = False               # or: carry VeRA / LoRA-XS / TinyLoRA exactly
    exact_format: str = "float32"     # float32 or float16 values when exact
    calib_data: Path | None = None    # .txt / .jsonl calibration texts (default: built-in task)
    model_dir: Path | None = None     # the bundle's base model (default: the embedded one)

    def __post_init__(self) -> None:
        modes = (self.budget is not None) + (self.max_error is not None) + bool(self.exact) + (
            self.max_drop is not None)
        if modes != 1:
            raise CodecError("give exactly one of budget, max_error, max_drop and exact")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise CodecError(f"max_drop must be >= 0 points, got {self.max_drop}")
        if not 0 < self.holdout < 1:
            raise CodecError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.exact and (self.refit_steps or self.metric != "fro"):
            raise CodecError("exact carrying fits nothing: no metric, no refit")
        if self.exact_format not in ("float32", "float16"):
            raise CodecError(f"exact_format must be float32 or float16, got "
                             f"{self.exact_format!r}")
        if self.metric not in METRICS:
            raise CodecError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.refit_steps and self.max_error is not None:
            raise CodecError("the refit changes the weight error, so it goes with a budget, "
                             "not an error bound")

    @property
    def effective_quant_weight(self) -> float:
        """The quantisation weight the fits use: as given, else by metric."""
        if self.quant_weight is not None:
            return self.quant_weight
        return DATA_FREE_QUANT_WEIGHT if self.metric == "fro" else 1.0

    @property
    def needs_data(self) -> bool:
        return self.metric != "fro" or self.refit_steps > 0


@dataclass
class Compressed:
    data: bytes                       # the signed packet
    alloc: Allocation | None          # per-layer choice and errors (before any refit)
    metadata: dict[str, Any]
    layer_names: dict[int, str]
    refit_loss: tuple[float, float] | None = None    # output loss before -> after
    refit_texts: int = 0
    exact_error: float | None = None  # relative error of an exact carry (float rounding)
    calibration: str | None = None    # where calibration texts came from
    extras_bytes: int = 0             # head tensors, bias and magnitude deltas
    notes: list[str] = field(default_factory=list)  # what the user should know
    curve: dict | None = None         # --max-drop: every budget measured, and the choice
    eval_source: str | None = None    # what the drop was measured on


def packet_metadata(task_meta: dict) -> dict:
    """What a packet carries about its task: name, label names, head seed."""
    return {k: task_meta[k] for k in PACKET_METADATA_KEYS if k in task_meta}


@dataclass
class _Prepared:
    """The adapter matched to the bundle, with its extras encoded and its metadata."""

    bundle: Bundle
    adapter: Adapter
    updates: dict[int, LayerUpdate]
    matched: MatchedExtras
    extras: ExtraRecords
    metadata: dict[str, Any]
    notes: list[str]


def _prepare(adapter: Adapter, bundle: Bundle,
             extras_formats: Sequence[ValueFormat] = EXTRA_FORMATS) -> _Prepared:
    check_task_type(adapter, bundle.manifest.get("model", {}).get("task_types"))
    updates = match_to_bundle(adapter.updates, bundle.layers)
    matched = match_extras(adapter.extras, bundle.layers).with_bias_deltas(
        bundle.base_bias, lambda lid: bundle.layers[lid].name)
    unpatchable = sorted(lid for lid in matched.biases if bundle.base_bias(lid) is None)
    if unpatchable:
        raise AdapterError(f"the adapter trains biases of layers {unpatchable[:6]} that this "
                           "bundle cannot patch (export the bundle again with this version)")
    meta = packet_metadata(adapter.task_meta)
    notes: list[str] = []
    check_magnitudes(matched.magnitudes, bundle, updates)
    extras = extra_records(matched.head, matched.biases, matched.magnitudes, bundle,
                           formats=extras_formats)
    if matched.head and bundle.manifest.get("model", {}).get("family") == DECODER_FAMILY:
        raise AdapterError(f"modules_to_save {sorted({n.rsplit('.', 1)[0] for n in matched.head})}"
                           ": a decoder bundle serves the base model's lm_head and embeddings; "
                           "train without modules_to_save")
    if matched.head:
        check_head_modules(matched.head, None)
        spec = head_spec(matched.head, lambda name: bundle.head_part(name) is not None,
                         *base_model_type(adapter, bundle))
        check_head_modules(matched.head, spec)
        check_pooler(spec, adapter, bundle)
        check_head_width(spec, matched.head, bundle.manifest.get("model", {}).get("hidden_size"))
        labels = adapter.labels
        count = num_labels(spec, matched.head)
        check_problem_type(adapter, count)
        if labels is None or len(labels) != count:
            if labels is not None:
                notes.append(f"{len(labels)} label names for a head of {count} outputs: "
                             "using LABEL_i")
            else:
                notes.append("no label names (config.json id2label): using LABEL_i")
            labels = [f"LABEL_{i}" for i in range(count)]
        meta = {k: v for k, v in meta.items() if k not in ("labels", "head_seed")}
        meta.update(labels=labels, head={**spec, "tensors": extras.head_tensors})
    return _Prepared(bundle, adapter, updates, matched, extras, meta, notes)


def prepare_adapter(adapter: Adapter, bundle: Bundle) -> _Prepared:
    """The adapter matched to ``bundle``, its extras (head, biases, magnitudes) encoded and
    its packet metadata, exactly as :func:`compress_adapter` makes them: for tools that build
    other packets from the same parts (``bench/rd_served.py``)."""
    return _prepare(adapter, bundle)


CANARIES = ("update", "outputs", "none")


def sign_packet(prep: _Prepared, records: list[LayerRecord], key, adapter_id: str,
                version: int = 1, *, canary: str = "update") -> tuple[bytes, dict[str, Any]]:
    """``records`` signed as :func:`compress_adapter` signs its packets: ``prep``'s metadata
    and the vouch ``canary`` names (:data:`CANARIES`; ``outputs`` needs the bundle to name
    canary inputs). Returns the packet and its final metadata."""
    final = _with_canary(prep, canary, lambda inputs: served_digest(
        prep.bundle, records, prep.metadata, inputs),
        lambda: served_update_digest(prep.bundle, records, prep.metadata))
    return _encode(prep, records, key, adapter_id, version, final), final


def _encode(prep: _Prepared, records: list[LayerRecord], key, adapter_id: str, version: int,
            metadata: dict[str, Any]) -> bytes:
    header = PacketHeader(prep.bundle.fingerprint, adapter_id, version, metadata)
    return encode_packet(header, CodecHeader(seed=0), records, key)


def _with_canary(prep: _Prepared, kind: str,
                 outputs_digest: Callable[[list[Any]], list[list[float]]],
                 updates_digest: Callable[[], list[list[float]]]) -> dict[str, Any]:
    """``prep``'s metadata and the vouch ``kind`` names: ``update_digest`` holding
    ``updates_digest()``, or (when the bundle names canary inputs) ``canary`` holding
    ``outputs_digest(inputs)``."""
    if kind not in CANARIES:
        raise ValueError(f"canary {kind!r}: one of {CANARIES}")
    meta = dict(prep.metadata)
    if kind == "update":
        meta["update_digest"] = {"digest": updates_digest(),
                                 "tolerance": update_digest.DEFAULT_TOLERANCE}
    inputs = (prep.bundle.manifest.get("canary") or {}).get("inputs")
    if kind == "outputs" and inputs:
        meta["canary"] = {"digest": outputs_digest(inputs), "tolerance": canary.DEFAULT_TOLERANCE}
    return meta


def _budgeted_metadata(prep: _Prepared, kind: str) -> dict[str, Any]:
    """The metadata a budget weighs: :func:`sign_packet`'s, its digest at its longest."""
    return _with_canary(prep, kind, lambda inputs: canary.placeholder(len(inputs)),
                        lambda: _update_placeholder(prep))


def _update_placeholder(prep: _Prepared) -> list[list[float]]:
    """An update digest at least as long in JSON as ``prep``'s real one: rows that stay
    zero (no row scales or bias deltas; no head) as zeros."""
    longest, zero = canary.placeholder(update_digest.ROWS), [0.0] * canary.DIGEST_DIMS
    vectors = bool(prep.matched.biases or prep.matched.magnitudes)
    head = "head" in prep.metadata or "head_seed" in prep.metadata
    return [longest[0], longest[1] if vectors else zero, longest[2] if head else zero]


def _torch_side(purpose: str):
    """The torch-side modules, or a CalibrationError saying which extra is missing."""
    try:
        from solar_edge.exporters import calibration, families, heads, refit
    except ImportError as exc:
        raise CalibrationError(f"{purpose} needs the [export] extra ({exc})") from exc
    return calibration, families, heads, refit


class _Calibration:
    """The bundle's base model, the calibration texts and the adapter as the teacher,
    opened once per compress."""

    def __init__(self, bundle: Bundle, prep: _Prepared, options: CompressOptions,
                 purpose: str) -> None:
        from solar_edge.exporters.calib_data import from_task, read_calibration_file

        self.calibration, families, self.heads, self.refit = _torch_side(purpose)
        from solar_edge.exporters.patches import adapter_patches

        adapter = prep.adapter
        labels = prep.metadata.get("labels")
        if options.calib_data is not None:
            data = read_calibration_file(options.calib_data, labels)
        else:
            data = from_task(adapter.task_meta)
            if data is None:
                raise CalibrationError(f"{purpose} needs calibration texts: give a .txt or "
                                       ".jsonl file of your task's inputs (--calib-data)")
        data.require(MIN_CALIBRATION_TEXTS, purpose)
        self.data = data
        self.model = families.open_bundle_model(bundle, options.model_dir, purpose)
        self.bundle, self.metadata = bundle, prep.metadata
        self.head = self.heads.head_for(prep.metadata, self.model.hidden_size,
                                        prep.matched.head, bundle) \
            or getattr(self.model, "output_head", None)  # a family's own outputs (decoders)
        self.teacher = adapter_patches(bundle, prep.updates, prep.matched.biases,
                                       prep.matched.magnitudes)

    def require_head(self, purpose: str):
        if self.head is None:
            raise CalibrationError(f"{purpose} matches the adapter's task outputs and needs "
                                   "its head (a trained classifier, or labels)")
        return self.head

    def packet_head(self, records: list) -> Any:
        """The head as a packet's HEAD_TENSOR records decode (quantised), for the student."""
        from solar_edge.decode import decode_factors

        declared = self.metadata.get("head", {}).get("tensors", [])
        tensors = {declared[r.layer_id]["name"]: decode_factors(r, None, CodecHeader(seed=0))
                   .reshape(declared[r.layer_id]["shape"])  # as the board does (a bias is 1-D)
                   for r in records if r.kind == RecordKind.HEAD_TENSOR}
        return self.heads.head_for(self.metadata, self.model.hidden_size, tensors, self.bundle)


def _statistics(cal: _Calibration, bundle: Bundle, updates: dict[int, LayerUpdate],
                options: CompressOptions) -> tuple[dict, dict | None]:
    """(input Grams, output-gradient Grams or None) for the metric; ({}, None) for fro."""
    if options.metric == "fro":
        return {}, None
    sub = cal.data.subset(options.calib)
    if options.metric == "act":
        grams = cal.calibration.calibration_grams(cal.model, bundle, sub.texts, sorted(updates))
        return grams, None
    head = cal.require_head("metric fisher (use --metric act for an adapter without a head)")
    return cal.calibration.calibration_fisher(cal.model, bundle, sub.texts, sub.labels,
                                              cal.teacher, head)


def compress_adapter(adapter_dir: str | Path, bundle: Bundle, key, options: CompressOptions,
                     *, adapter_id: str | None = None, version: int = 1,
                     on_refit_step: Callable[[int, int, float], None] | None = None,
                     on_point: Callable[[Any], None] | None = None,
                     ) -> Compressed:
    """Compress ``adapter_dir`` into a packet for ``bundle`` signed with ``key``."""
    adapter_dir = Path(adapter_dir)
    exact_fmt = ValueFormat.FLOAT32 if options.exact_format == "float32" else ValueFormat.FLOAT16
    # an exact packet carries its head, biases and magnitudes at its own format too
    prep = _prepare(read_adapter(adapter_dir), bundle,
                    (exact_fmt,) if options.exact else EXTRA_FORMATS)
    adapter, updates, meta = prep.adapter, prep.updates, prep.metadata
    bases = {lid: bundle.layer_basis(lid) for lid in updates}
    adapter_id = adapter_id or adapter_dir.name
    names = {lid: u.name for lid, u in updates.items()}
    extras = prep.extras.records
    budgeted = _budgeted_metadata(prep, options.canary)

    def sign(records: list[LayerRecord]) -> tuple[bytes, dict[str, Any]]:
        return sign_packet(prep, records, key, adapter_id, version, canary=options.canary)

    def budget_size(records: list[LayerRecord]) -> int:
        """Bytes of the packet ``sign`` would write, its canary digest at its longest."""
        return len(_encode(prep, records + extras, key, adapter_id, version, budgeted))

    if options.exact:
        from solar_edge.encode.carry import exact_records

        records, error = exact_records(adapter, updates, bases, exact_fmt)
        data, meta = sign(records + extras)
        return Compressed(data, None, meta, names, exact_error=error,
                          extras_bytes=prep.extras.nbytes, notes=prep.notes)
    purpose = f"metric {options.metric}" if options.metric != "fro" else "the refit"
    cal = _Calibration(bundle, prep, options, purpose) if options.needs_data else None
    held = eval_set(options, cal, prep) if options.max_drop is not None else None
    grams, out_grams = _statistics(cal, bundle, updates, options) if cal else ({}, None)
    overhead = fixed_overhead_bytes(adapter_id, budgeted) + prep.extras.nbytes
    fits = layer_options(updates, bases, grams,
                         AllocConfig(max_rank=options.max_rank, overhead_bytes=overhead,
                                     quant_weight=options.effective_quant_weight),
                         out_grams)

    def allocation_at(budget: int | None) -> Allocation:
        balance = options.metric == "fro"  # data-free: every layer counts alike
        cover = balance and options.cover
        if budget is not None:
            return allocation_for_budget(fits, budget, overhead, balance, cover)
        assert options.max_error is not None
        return allocation_for_error(fits, options.max_error, overhead, balance, cover)

    def records_at(budget: int | None) -> tuple[Allocation, list[LayerRecord], Any]:
        alloc = allocation_at(budget)
        records = alloc.records + extras
        if not options.refit_steps:
            return alloc, records, None
        assert cal is not None
        report = cal.refit.refit_records(cal.model, bundle, records, cal.teacher, bases,
                                         cal.data.texts, cal.require_head("the refit"),
                                         cal.refit.RefitConfig(steps=options.refit_steps),
                                         progress=on_refit_step,
                                         student_head=cal.packet_head(records))
        return alloc, report.records, report

    curve = None
    if held is None:
        budget = options.budget
        if budget is not None:
            allocation_at(budget)  # a budget too small is refused as the user gave it
            budget = fill_budget(lambda b: budget_size(allocation_at(b).records), budget,
                                 largest_bytes(fits, overhead))
        alloc, records, report = records_at(budget)
        data, meta = sign(records)
        if options.budget is not None and len(data) > options.budget:
            # the refit's values compressed worse than the fitted ones: the uncompressed bound
            alloc, records, report = records_at(options.budget)
            data, meta = sign(records)
    else:
        plain = plain_candidates(prep, bundle, fits, grams, out_grams, overhead)
        alloc, records, report, curve = smallest_within(
            prep, bundle, options, held, records_at, fits, overhead, on_point, plain,
            final_size=lambda records: len(sign(records)[0]))
        data, meta = sign(records)
        from .target_search import chosen_row

        chosen_row(curve)["bytes"] = len(data)  # the probe's size + an offset was +-2 B
    return Compressed(data, alloc, meta, names,
                      None if report is None else (report.loss_before, report.loss_after),
                      len(cal.data) if report is not None and cal is not None else 0,
                      calibration=cal.data.source if cal else None,
                      extras_bytes=prep.extras.nbytes, notes=prep.notes, curve=curve,
                      eval_source=None if held is None else held.source)
