"""The plain baselines: what an adapter compresses to without the codec's fits.

Two families, every layer treated alike (pure numpy):

* the adapter's own factors (``dW = B @ A``) quantised at int8 / int4 / int3, groups of 64;
* rank-``k`` re-truncation: the best rank-``k`` approximation of each layer's ``dW``
  (:func:`solar_edge.encode.solar.encode`, plain factors) at int4 / int8, for ``k`` = 1, 2, 4
  and the adapter's own rank.

An accuracy-targeted search (``compress --max-drop``) measures these beside its own pick,
so its packet is never larger than a plain baseline that also keeps the target; the
rate-distortion benches measure the codec against the same set.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from solar_edge.encode.quant import quantize
from solar_edge.encode.solar import CodecConfig, encode
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.records import LayerRecord, RecordKind, ValueFormat
from solar_edge.methods.base import LayerUpdate

GROUP = 64
OWN_FORMATS = {"int8": ValueFormat.INT8, "int4": ValueFormat.INT4, "int3": ValueFormat.INT3}
RETRUNCATION_RANKS = (1, 2, 4)       # and the adapter's own rank
RETRUNCATION_FORMATS = {"int4": ValueFormat.INT4, "int8": ValueFormat.INT8}


def own_factor_records(updates: Mapping[int, LayerUpdate], fmt: ValueFormat
                       ) -> list[LayerRecord]:
    """The adapter's own factors as DENSE_FACTORS records at ``fmt``."""
    records = []
    for lid, u in sorted(updates.items()):
        B, A = np.asarray(u.B), np.asarray(u.A)
        values = np.concatenate([B.reshape(-1), A.T.reshape(-1)])
        records.append(LayerRecord(lid, RecordKind.DENSE_FACTORS, B.shape[0], A.shape[1],
                                   B.shape[1], quantize(values, fmt, GROUP)))
    return records


def retruncated_records(updates: Mapping[int, LayerUpdate], bases: Mapping[int, LayerBasis],
                        rank: int, fmt: ValueFormat) -> list[LayerRecord]:
    """Each layer's ``dW`` re-truncated to rank ``rank``, plain factors at ``fmt``."""
    config = CodecConfig(representation="dense_factors", max_rank=rank, value_format=fmt)
    return encode(dict(updates), dict(bases), config).records


def adapter_rank(updates: Mapping[int, LayerUpdate]) -> int:
    return max(int(np.asarray(u.B).shape[1]) for u in updates.values())


def retruncation_ranks(updates: Mapping[int, LayerUpdate]) -> list[int]:
    """``RETRUNCATION_RANKS`` below the adapter's own rank, and that rank."""
    rank = adapter_rank(updates)
    return sorted({*(k for k in RETRUNCATION_RANKS if k < rank), rank})


def plain_baselines(updates: Mapping[int, LayerUpdate], bases: Mapping[int, LayerBasis]
                    ) -> list[tuple[str, list[LayerRecord]]]:
    """Every plain baseline as ``(name, records)``: ``own-int3``, ``r4-int4``, ..."""
    out = [(f"own-{name}", own_factor_records(updates, fmt))
           for name, fmt in OWN_FORMATS.items()]
    for k in retruncation_ranks(updates):
        for name, fmt in RETRUNCATION_FORMATS.items():
            out.append((f"r{k}-{name}", retruncated_records(updates, bases, k, fmt)))
    return out
