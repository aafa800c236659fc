"""Symmetric per-group quantisation of record values (the wire layout is in
:mod:`solar_edge.format.layout`, the bit packing in :mod:`solar_edge.format.bitpack`).

Integer formats keep codes in ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` with one float16 scale per
``group_size`` values; a value is ``code * scale`` in float32. :func:`quantize` scales by each
group's absolute maximum (no clipping); :func:`mse_quantize` searches the scale that
minimises the group's squared error, which matters at 2-4 bits.
"""

from __future__ import annotations

import numpy as np

from solar_edge.errors import CodecError
from solar_edge.format.records import QuantizedValues, ValueFormat

_F16_MAX = float(np.finfo(np.float16).max)


def qmax(fmt: ValueFormat) -> int:
    """Largest code magnitude of an integer format: ``2**(b-1) - 1``."""
    return (1 << (fmt.bits - 1)) - 1


def _group_scales(absmax: np.ndarray, q: int) -> np.ndarray:
    """float16 scales with ``float32(scale) * q >= absmax`` (no clipping), 0 for zero groups."""
    if np.any(absmax / q > _F16_MAX):
        raise CodecError("value too large for a float16 group scale")
    scales = (absmax / q).astype(np.float16)
    too_small = scales.astype(np.float32) * np.float32(q) < absmax
    scales[too_small] = np.nextafter(scales[too_small], np.float16(np.inf))
    return scales


def quantize(values: np.ndarray, fmt: ValueFormat, group_size: int = 64) -> QuantizedValues:
    """Quantise a 1-D array. Integer formats: round-to-nearest against the float16 scale."""
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise CodecError("cannot quantise non-finite values")
    fmt = ValueFormat(fmt)
    if fmt == ValueFormat.FLOAT32:
        return QuantizedValues(fmt, x.size, raw=x.copy())
    if fmt == ValueFormat.FLOAT16:
        if x.size and float(np.abs(x).max()) > _F16_MAX:
            raise CodecError("value too large for float16")
        return QuantizedValues(fmt, x.size, raw=x.astype(np.float16))
    if not 1 <= group_size <= 0xFFFF:
        raise CodecError(f"group_size must be in 1..65535, got {group_size}")
    q = qmax(fmt)
    n_groups = -(-x.size // group_size)
    padded = np.zeros(n_groups * group_size, np.float32)
    padded[: x.size] = x
    groups = padded.reshape(n_groups, group_size)
    scales = _group_scales(np.abs(groups).max(axis=1), q)
    s32 = scales.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s32 > 0, np.rint(groups / s32), 0.0)
    codes = np.clip(codes, -q, q).astype(np.int8).reshape(-1)[: x.size]
    return QuantizedValues(fmt, x.size, group_size, codes=codes, scales=scales)


_SCALE_STEPS = np.linspace(0.3, 1.0, 15)


def mse_quantize(values: np.ndarray, fmt: ValueFormat, group: int) -> QuantizedValues:
    """Symmetric group quantisation whose float16 scale minimises each group's squared error.

    Absmax scaling (:func:`quantize`) wastes most codes at 2-3 bits; here each group tries
    ``scale = c * absmax / qmax`` for ``c`` in 0.3..1 (codes clipped to ``+-qmax``) and keeps
    the best. Same wire format, so any decoder reads it."""
    x = np.asarray(values, np.float32).reshape(-1)
    q = qmax(fmt)
    n_groups = -(-x.size // group)
    padded = np.zeros(n_groups * group, np.float32)
    padded[: x.size] = x
    g = padded.reshape(n_groups, group)
    absmax = np.abs(g).max(axis=1)
    cand = (absmax[:, None] * _SCALE_STEPS[None, :] / q).astype(np.float16)  # groups x steps
    c32 = cand.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(c32 > 0, np.clip(np.rint(g[:, None, :] / c32), -q, q), 0.0)
    err = ((codes * c32 - g[:, None, :]) ** 2).sum(axis=2)
    best = err.argmin(axis=1)
    rows = np.arange(n_groups)
    scales = cand[rows, best]
    out = codes[rows, best].astype(np.int8).reshape(-1)[: x.size]
    return QuantizedValues(fmt, x.size, group, codes=out, scales=scales)


def best_quantize(values: np.ndarray, fmt: ValueFormat, group: int) -> QuantizedValues:
    """:func:`mse_quantize` for integer formats, :func:`quantize` for floats."""
    return mse_quantize(values, fmt, group) if fmt.is_integer else quantize(values, fmt, group)
