"""A PEFT adapter directory -> one signed packet for a bundle: the compress pipeline.

``compress_adapter`` is what ``solar-edge compress`` and the demo run:

1. read the adapter and match its layers to the bundle's adaptable weights;
2. (metric ``act`` / ``fisher``) calibration statistics on the task's training texts;
3. one global byte allocation (:mod:`solar_edge.encode.allocate`) under a budget, or the smallest
   budget meeting an error bound;
4. (``refit_steps > 0``, budget mode) the output-matching refit of the chosen records
   (:mod:`solar_edge.exporters.refit`): same records and bytes, values tuned on the task's
   unlabelled training texts;
5. sign the packet.

With ``exact=True`` steps 2-4 are replaced by carrying the adapter's trained numbers
coefficient-only (:mod:`solar_edge.encode.carry`: VeRA scales, LoRA-XS/TinyLoRA cores), for the
kinds whose frozen basis the device can regenerate.

Steps 2 and 4 need the ``[export]`` extra (torch, transformers); a missing extra or a
task.json without a task name is a :class:`~solar_edge.errors.CalibrationError`.
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
from solar_edge.methods.matching import match_to_bundle
from solar_edge.methods.peft_files import read_adapter

METRICS = ("fro", "act", "fisher")
PACKET_METADATA_KEYS = ("task", "labels", "head_seed")


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


@dataclass
class Compressed:
    data: bytes                       # the signed packet
    alloc: Allocation | None          # per-layer choice and errors (before any refit)
    metadata: dict[str, Any]
    layer_names: dict[int, str]
    refit_loss: tuple[float, float] | None = None    # output loss before -> after
    refit_texts: int = 0
    exact_error: float | None = None  # relative error of an exact carry (float rounding)


def packet_metadata(task_meta: dict) -> dict:
    """What a packet carries about its task: name, label names, head seed."""
    return {k: task_meta[k] for k in PACKET_METADATA_KEYS if k in task_meta}


def training_split(task_meta: dict, purpose: str):
    """The training split of the adapter's task (texts and labels), for calibration."""
    try:
        from solar_edge.exporters.tasks import load_task
    except ImportError as exc:
        raise CalibrationError(f"{purpose} needs the [export] extra ({exc})") from exc
    name = task_meta.get("task")
    if not name:
        raise CalibrationError(f"{purpose} needs task.json with a 'task' name")
    return load_task(name).train


def calibration_statistics(bundle: Bundle, task_meta: dict, updates: dict, n_texts: int,
                           metric: str) -> tuple[dict, dict | None]:
    """(input Grams, output-gradient Grams or None) for the metric; ({}, None) for fro."""
    if metric == "fro":
        return {}, None
    train = training_split(task_meta, f"metric {metric}")
    from solar_edge.exporters.calibration import calibration_fisher, calibration_grams

    step = max(1, len(train) // n_texts)
    texts, labels = train.texts[::step][:n_texts], train.labels[::step][:n_texts]
    if metric == "act":
        return calibration_grams(bundle, texts, sorted(updates)), None
    dense = {lid: u.B @ u.A for lid, u in updates.items()}
    return calibration_fisher(bundle, texts, labels, dense, int(task_meta["head_seed"]),
                              len(task_meta["labels"]))


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
    grams, out_grams = calibration_statistics(bundle, adapter.task_meta, updates,
                                              options.calib, options.metric)
    alloc = encode_adapter(updates, bases, grams,
                           AllocConfig(max_rank=options.max_rank,
                                       overhead_bytes=fixed_overhead_bytes(adapter_id, meta)),
                           budget_bytes=options.budget, max_error=options.max_error,
                           out_grams=out_grams)
    records, refit_loss, refit_texts = alloc.records, None, 0
    if options.refit_steps:
        train = training_split(adapter.task_meta, "the refit")
        if "head_seed" not in meta or not meta.get("labels"):
            raise CalibrationError("the refit needs task.json with 'head_seed' and 'labels'")
        from solar_edge.exporters.refit import RefitConfig, refit_records

        report = refit_records(bundle, alloc.records, updates, bases, list(train.texts),
                               int(meta["head_seed"]), len(meta["labels"]),
                               RefitConfig(steps=options.refit_steps), progress=on_refit_step)
        records, refit_texts = report.records, len(train.texts)
        refit_loss = (report.loss_before, report.loss_after)
    data = encode_packet(header, CodecHeader(seed=0), records, key)
    return Compressed(data, alloc, meta, names, refit_loss, refit_texts)
