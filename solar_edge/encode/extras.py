"""Records for what an adapter trains besides its low-rank updates: head tensors, bias
deltas and DoRA magnitude deltas, each at the smallest value format that keeps it accurate.

* a head tensor (``HEAD_TENSOR``, PEFT ``modules_to_save``) is carried as it is;
* a bias as ``trained - b0`` (``BIAS_DELTA``; ``b0`` the bundle's base bias, zero if none);
* a DoRA magnitude as ``m - |W0|_row`` (``MAGNITUDE_DELTA``): the device adds the row norms
  of its pristine base weight.

Formats are tried from the smallest (``CANDIDATES``); the first whose relative Frobenius
error is at most ``tolerance`` is kept (float32 always qualifies). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from solar_edge.encode.quant import best_quantize
from solar_edge.format.bundle import Bundle
from solar_edge.format.layout import record_nbytes
from solar_edge.format.records import LayerRecord, QuantizedValues, RecordKind, ValueFormat

CANDIDATES = (ValueFormat.INT4, ValueFormat.INT5, ValueFormat.INT6, ValueFormat.INT8,
              ValueFormat.FLOAT16, ValueFormat.FLOAT32)
DEFAULT_TOLERANCE = 0.01
GROUP = 64


def smallest_accurate(values: np.ndarray, tolerance: float,
                      formats: Sequence[ValueFormat] = CANDIDATES) -> QuantizedValues:
    """The first format in ``formats`` whose decoded values are within ``tolerance``
    (relative Frobenius error); float32 when none is."""
    x = np.asarray(values, np.float32).reshape(-1)
    norm = float(np.linalg.norm(x))
    for fmt in formats:
        if fmt == ValueFormat.FLOAT16 and x.size and float(np.abs(x).max()) > 65504:
            continue
        qv = best_quantize(x, fmt, GROUP)
        if norm == 0 or float(np.linalg.norm(qv.dequantize() - x)) <= tolerance * norm:
            return qv
    return best_quantize(x, ValueFormat.FLOAT32, GROUP)


@dataclass(frozen=True)
class ExtraRecords:
    records: list[LayerRecord]
    head_tensors: list[dict]   # metadata["head"]["tensors"]: name and shape, in record order

    @property
    def nbytes(self) -> int:
        return sum(record_nbytes(r) for r in self.records)


def extra_records(head: Mapping[str, np.ndarray], biases: Mapping[int, np.ndarray],
                  magnitudes: Mapping[int, np.ndarray], bundle: Bundle,
                  tolerance: float = DEFAULT_TOLERANCE,
                  formats: Sequence[ValueFormat] = CANDIDATES) -> ExtraRecords:
    """``head``: tensors by name (order kept); ``biases`` / ``magnitudes``: trained values by
    bundle layer id (:class:`~solar_edge.methods.matching.MatchedExtras`)."""
    records: list[LayerRecord] = []
    declared: list[dict] = []
    for i, (name, tensor) in enumerate(head.items()):
        t = np.asarray(tensor, np.float32)
        rows, cols = (t.shape[0], 1) if t.ndim == 1 else (t.shape[0], int(np.prod(t.shape[1:])))
        records.append(LayerRecord(i, RecordKind.HEAD_TENSOR, rows, cols, 0,
                                   smallest_accurate(t, tolerance, formats)))
        declared.append({"name": name, "shape": [int(d) for d in t.shape]})
    for lid, trained in sorted(biases.items()):
        b0 = bundle.base_bias(lid)
        delta = np.asarray(trained, np.float32) - (0.0 if b0 is None else np.asarray(b0))
        records.append(LayerRecord(lid, RecordKind.BIAS_DELTA, delta.size, 1, 0,
                                   smallest_accurate(delta, tolerance, formats)))
    for lid, m in sorted(magnitudes.items()):
        w0 = np.asarray(bundle.base_weight(lid), np.float64)
        delta = (np.asarray(m, np.float64) - np.sqrt((w0 * w0).sum(axis=1))).astype(np.float32)
        records.append(LayerRecord(lid, RecordKind.MAGNITUDE_DELTA, delta.size, 1, 0,
                                   smallest_accurate(delta, tolerance, formats)))
    return ExtraRecords(records, declared)
