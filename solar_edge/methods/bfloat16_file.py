"""A safetensors file with bfloat16 tensors, read as float32 (numpy has no bfloat16).

``safetensors.numpy`` refuses such files, and adapters trained in bfloat16 are saved so.
The format is an 8-byte little-endian header length, a JSON header ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}}`` (offsets into the data after the header) and the
data. Every field is checked before anything is allocated from it; a bfloat16 value is the
upper half of the float32 with the same bits, so widening it is exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from solar_edge.errors import AdapterError

MAX_HEADER_BYTES = 100 << 20
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the float32 values they stand for."""
    return (np.asarray(bits, np.uint32) << np.uint32(16)).view(np.float32)


def _entry(path: Path, name: str, spec: object, data_len: int
           ) -> tuple[str, list[int], int, int]:
    if not isinstance(spec, dict):
        raise AdapterError(f"{path}: tensor {name!r} has no description")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise AdapterError(f"{path}: tensor {name!r} has dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                            and d >= 0 for d in shape)):
        raise AdapterError(f"{path}: tensor {name!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len):
        raise AdapterError(f"{path}: tensor {name!r} has data offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype].itemsize:
        raise AdapterError(f"{path}: tensor {name!r}: {offsets[1] - offsets[0]} bytes for "
                           f"shape {shape} of {dtype}")
    return dtype, shape, offsets[0], offsets[1]


def read_bfloat16_file(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file ``path``; bfloat16 ones widened to float32."""
    raw = path.read_bytes()
    if len(raw) < 8:
        raise AdapterError(f"{path}: too short for a safetensors file")
    size = int.from_bytes(raw[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(raw) - 8):
        raise AdapterError(f"{path}: header of {size} bytes in a file of {len(raw)}")
    try:
        header = json.loads(raw[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: safetensors header is not an object")
    data = memoryview(raw)[8 + size:]
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, spec, len(data))
        values = np.frombuffer(data[begin:end], DTYPES[dtype]).reshape(shape)
        tensors[name] = widen_bfloat16(values) if dtype == "BF16" else values.copy()
    return tensors
