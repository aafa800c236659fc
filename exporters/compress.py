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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solar_edge.encode.allocate import Allocation, AllocConfig, encode_adapter
from solar_edge.errors import CalibrationError, CodecError
from solar_edge.format.bundle import Bundle
from solar_edge.format.layout import fixed_overhead_bytes
from solar_edge.format.packet import PacketHeader
from solar_edge.format.records import CodecHeader, ValueFormat
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import Adapter, LayerUpdate
from solar_edge.methods.matching import match_to_bundle
from solar_edge.methods.peft_files import read_adapter

METRICS = ("fro", "act", "fisher")
PACKET_METADATA_KEYS = ("task", "labels", "head_seed")
MIN_CALIBRATION_TEXTS = 8


@dataclass(frozen=True)
class CompressOptions:
    budget: int | None = None         # largest packet in bytes (uncompressed bound)
    max_error: float | None = None    # or: largest overall relative error in ``metric``
    metric: str = "fro"
    calib: int = 64                   # calibration texts for act / fisher
    max_rank: int = 4
    refit_steps: int = 0              # output-matching refit (budget mode only)
    exact: bool = False               # or: carry VeRA / LoRA-XS / TinyLoRA exactly
    exact_format: str = "float32"     # float32 or float16 values when exact
    calib_data: Path | None = None    # .txt / .jsonl calibration texts (default: built-in task)
    model_dir: Path | None = None     # the bundle's base model (default: the embedded one)

    def __post_init__(self) -> None:
        modes = (self.budget is not None) + (self.max_error is not None) + bool(self.exact)
        if modes != 1:
            raise CodecError("give exactly one of budget, max_error and exact")
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


def packet_metadata(task_meta: dict) -> dict:
    """What a packet carries about its task: name, label names, head seed."""
    return {k: task_meta[k] for k in PACKET_METADATA_KEYS if k in task_meta}


def _torch_side(purpose: str):
    """The torch-side modules, or a CalibrationError saying which extra is missing."""
    try:
        from solar_edge.exporters import calibration, families, heads, refit
    except ImportError as exc:
        raise CalibrationError(f"{purpose} needs the [export] extra ({exc})") from exc
    return calibration, families, heads, refit


class _Calibration:
    """The bundle's base model and the calibration texts, opened once per compress."""

    def __init__(self, bundle: Bundle, adapter: Adapter, options: CompressOptions,
                 purpose: str) -> None:
        from solar_edge.exporters.calib_data import from_task, read_calibration_file

        self.calibration, families, heads, self.refit = _torch_side(purpose)
        labels = adapter.task_meta.get("labels")
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
        self.head = heads.head_for(packet_metadata(adapter.task_meta), self.model.hidden_size)


def _statistics(cal: _Calibration, bundle: Bundle, updates: dict[int, LayerUpdate],
                options: CompressOptions) -> tuple[dict, dict | None]:
    """(input Grams, output-gradient Grams or None) for the metric; ({}, None) for fro."""
    if options.metric == "fro":
        return {}, None
    sub = cal.data.subset(options.calib)
    if options.metric == "act":
        grams = cal.calibration.calibration_grams(cal.model, bundle, sub.texts, sorted(updates))
        return grams, None
    if cal.head is None:
        raise CalibrationError("metric fisher needs the adapter's task head (labels); "
                               "use --metric act for an adapter without one")
    dense = {lid: u.B @ u.A for lid, u in updates.items()}
    return cal.calibration.calibration_fisher(cal.model, bundle, sub.texts, sub.labels, dense,
                                              cal.head)


def compress_adapter(adapter_dir: str | Path, bundle: Bundle, key, options: CompressOptions,
                     *, adapter_id: str | None = None, version: int = 1,
                     on_refit_step: Callable[[int, int, float], None] | None = None,
                     ) -> Compressed:
    """Compress ``adapter_dir`` into a packet for ``bundle`` signed with ``key``."""
    adapter_dir = Path(adapter_dir)
    adapter = read_adapter(adapter_dir)
    updates = match_to_bundle(adapter.updates, bundle.layers)
    bases = {lid: bundle.layer_basis(lid) for lid in updates}
    adapter_id = adapter_id or adapter_dir.name
    meta = packet_metadata(adapter.task_meta)
    header = PacketHeader(bundle.fingerprint, adapter_id, version, meta)
    names = {lid: u.name for lid, u in updates.items()}
    if options.exact:
        from solar_edge.encode.carry import exact_records

        fmt = ValueFormat.FLOAT32 if options.exact_format == "float32" else ValueFormat.FLOAT16
        records, error = exact_records(adapter, updates, bases, fmt)
        data = encode_packet(header, CodecHeader(seed=0), records, key)
        return Compressed(data, None, meta, names, exact_error=error)
    purpose = f"metric {options.metric}" if options.metric != "fro" else "the refit"
    cal = _Calibration(bundle, adapter, options, purpose) if options.needs_data else None
    grams, out_grams = _statistics(cal, bundle, updates, options) if cal else ({}, None)
    alloc = encode_adapter(updates, bases, grams,
                           AllocConfig(max_rank=options.max_rank,
                                       overhead_bytes=fixed_overhead_bytes(adapter_id, meta)),
                           budget_bytes=options.budget, max_error=options.max_error,
                           out_grams=out_grams)
    records, refit_loss, refit_texts = alloc.records, None, 0
    if options.refit_steps:
        assert cal is not None
        if cal.head is None:
            raise CalibrationError("the refit matches the adapter's task outputs and needs its "
                                   "head (labels)")
        report = cal.refit.refit_records(cal.model, bundle, alloc.records, updates, bases,
                                         cal.data.texts, cal.head,
                                         cal.refit.RefitConfig(steps=options.refit_steps),
                                         progress=on_refit_step)
        records, refit_texts = report.records, len(cal.data)
        refit_loss = (report.loss_before, report.loss_after)
    data = encode_packet(header, CodecHeader(seed=0), records, key)
    return Compressed(data, alloc, meta, names, refit_loss, refit_texts,
                      calibration=cal.data.source if cal else None)
