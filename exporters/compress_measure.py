"""Measuring packets as a board serves them, for the compress pipeline.

* :func:`lossless_records`: the uncompressed adapter as a packet (float32 factors and
  extras), the reference accuracy targets are measured against;
* :func:`smallest_within`: the ``--max-drop`` search (:mod:`.target_search`) over budgets,
  then over the plain baselines smaller than its pick;
* :func:`served_digest`: the output canary digest a packet carries
  (:mod:`solar_edge.regen.canary`); :func:`served_update_digest`: its update digest
  (:mod:`solar_edge.regen.update_digest`).

``prep`` is the pipeline's matched adapter (``exporters.compress._Prepared``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from solar_edge.encode.allocate import (
    Allocation,
    allocation_of,
    largest_bytes,
    scored_records,
    uniform_allocations,
)
from solar_edge.encode.baselines import plain_baselines
from solar_edge.encode.extras import extra_records
from solar_edge.errors import CalibrationError
from solar_edge.format.bundle import Bundle
from solar_edge.format.packet import PacketHeader
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet
from solar_edge.regen import canary


def lossless_records(prep: Any) -> list[LayerRecord]:
    """The uncompressed adapter as a packet: float32 factors and extras (the reference a
    search measures packets against)."""
    records = []
    for lid, u in sorted(prep.updates.items()):
        B, A = np.asarray(u.B, np.float64), np.asarray(u.A, np.float64)
        if B.shape[1] > min(B.shape[0], A.shape[1]):  # wider than the weight: exact SVD
            q1, r1 = np.linalg.qr(B)
            q2, r2 = np.linalg.qr(A.T)
            p, sv, qt = np.linalg.svd(r1 @ r2.T)
            k = min(B.shape[0], A.shape[1])
            B, A = (q1 @ p[:, :k]) * sv[:k], (q2 @ qt.T[:, :k]).T
        values = np.concatenate([B.reshape(-1), A.T.reshape(-1)]).astype(np.float32)
        records.append(LayerRecord(lid, RecordKind.DENSE_FACTORS, B.shape[0], A.shape[1],
                                   B.shape[1], QuantizedValues(ValueFormat.FLOAT32, values.size,
                                                               raw=values)))
    return records + extra_records(prep.matched.head, prep.matched.biases,
                                   prep.matched.magnitudes, prep.bundle, tolerance=0.0,
                                   formats=(ValueFormat.FLOAT32,)).records


def served_digest(bundle: Bundle, records: list[LayerRecord], metadata: dict[str, Any],
                  inputs: list[Any]) -> list[list[float]]:
    """What a board serving ``records`` outputs on the canary inputs, as a digest."""
    from solar_edge.format import signing
    from solar_edge.runtime.engine import EdgeRuntime

    key = signing.generate_private_key()
    runtime = EdgeRuntime(str(bundle.root), [key.public_key()])
    runtime.apply(encode_packet(PacketHeader(bundle.fingerprint, "canary", 1, metadata),
                                CodecHeader(seed=0), records, key))
    return canary.digest(runtime.infer(inputs))


def served_update_digest(bundle: Bundle, records: list[LayerRecord],
                         metadata: dict[str, Any]) -> list[list[float]]:
    """The update digest a board computes from ``records`` (what it checks a packet's
    ``update_digest`` against), from the board's own decoder."""
    from solar_edge.format import signing
    from solar_edge.runtime.engine import EdgeRuntime

    key = signing.generate_private_key()
    runtime = EdgeRuntime(str(bundle.root), [key.public_key()])
    info = runtime.stage(encode_packet(PacketHeader(bundle.fingerprint, "canary", 1, metadata),
                                       CodecHeader(seed=0), records, key))
    return runtime.update_digest(info.adapter_id)


def eval_set(options: Any, cal: Any, prep: Any) -> Any:
    from solar_edge.exporters.calib_data import read_calibration_file

    if options.eval_data is not None:
        return read_calibration_file(options.eval_data, prep.metadata.get("labels"))
    if cal is None:
        raise CalibrationError("--max-drop measures packets on texts: give --eval-data FILE "
                               "(or --calib-data, of which a part is held back)")
    cal.data, held = cal.data.split(options.holdout)
    return held


def plain_candidates(prep: Any, bundle: Bundle, fits: dict, grams: dict, out_grams: Any,
                     overhead: int) -> list[tuple[str, Allocation]]:
    """What the search holds its pick against: every layer at one rank and width from the
    codec's own fits (``r4-int4``), and the plain baselines as anyone would make them
    (:mod:`solar_edge.encode.baselines`: ``baseline own-int3``, ``baseline r8-int4``)."""
    bases = {lid: bundle.layer_basis(lid) for lid in prep.updates}
    out = list(uniform_allocations(fits, overhead))
    metric: dict = {}  # each layer's Grams, formed once for every baseline
    for name, records in plain_baselines(prep.updates, bases):
        scored = scored_records(prep.updates, records, grams, out_grams, metric)
        out.append((f"baseline {name}", allocation_of(fits, scored, overhead)))
    return out


def smallest_within(prep: Any, bundle: Bundle, options: Any, eval_set: Any,
                     records_at: Callable[[int | None], tuple[Allocation, list, Any]],
                     fits: dict, overhead: int, on_point: Callable[[Any], None] | None,
                     plain: list[tuple[str, Allocation]] | None = None,
                     final_size: Callable[[list[LayerRecord]], int] | None = None):
    """The allocation of the smallest budget whose packet keeps the drop within target;
    then the ``plain`` candidates smaller than it (default: the codec's uniform fits).
    ``final_size(records)``: the bytes of the packet finally signed from ``records`` (its
    digests, id and version): every size reported is the final packet's, not the probe's."""
    from solar_edge.exporters.target_search import BoardMeter, plain_within, search

    meter = BoardMeter(str(bundle.root), eval_set.texts, eval_set.labels)

    def candidate(records: list[LayerRecord]) -> bytes:
        head = PacketHeader(bundle.fingerprint, "candidate", meter.next_version(),
                            prep.metadata)
        return encode_packet(head, CodecHeader(seed=0), records, meter.key)

    lossless = lossless_records(prep)
    reference = meter.measure(candidate(lossless))
    extras = prep.extras.records
    offset = 0 if final_size is None else final_size(lossless) - len(candidate(lossless))
    built: dict[int, tuple] = {}

    def build(budget: int) -> bytes:
        built[budget] = records_at(budget)
        return candidate(built[budget][1])

    smallest = min((f.nbytes for opts in fits.values() for f in opts if f.kind), default=0)
    largest = largest_bytes(fits, overhead)
    lo = max(overhead + smallest, min(largest, 2 * overhead))
    assert options.max_drop is not None
    chosen, curve = search(build, meter.measure, reference, options.max_drop, lo, largest,
                           on_point, offset)
    alloc, records, report = built[chosen]
    pick = next(c for c in curve if c.budget == chosen)
    plain = uniform_allocations(fits, overhead) if plain is None else plain
    won, tried = plain_within(
        [(name, lambda a=a: candidate(a.records + extras)) for name, a in plain],
        meter.measure, reference, options.max_drop, pick.nbytes, on_point, offset)
    if won is not None:
        alloc, report, pick = plain[won][1], None, tried[-1]
        records = alloc.records + extras
    return alloc, records, report, {"chosen": pick.budget, "chosen_method": pick.method,
                                    "max_drop": options.max_drop,
                                    "reference_accuracy": reference.accuracy,
                                    "points": [c.row() for c in curve + tried]}
