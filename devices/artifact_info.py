"""What linkbench compares, read from the files themselves: which files a full model is,
and the real dtype of each artifact.

* An ONNX graph's initializers (data type, size, external data file) are read straight
  from its protobuf wire format (no ``onnx`` import on the device side): the full model
  is the graph plus every external data file it names (a bundle's patchable per-layer
  ``weights/*.npy`` among them), plus any layer weight file in ``manifest.json`` that
  the graph does not name.
* A LoRA's dtypes come from its safetensors header; ``.npy`` dtypes from their header;
  a SOLAR packet's from its records' value formats.

A dtype summary is ``"float32"`` or, mixed, ``"float32 96%, float16 4%"`` by bytes.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from solar_edge.errors import AdapterError, BundleError, PacketError
from solar_edge.format.reader import decode_packet

# TensorProto.DataType -> (name, bytes per element)
ONNX_DTYPES = {1: ("float32", 4), 2: ("uint8", 1), 3: ("int8", 1), 4: ("uint16", 2),
               5: ("int16", 2), 6: ("int32", 4), 7: ("int64", 8), 9: ("bool", 1),
               10: ("float16", 2), 11: ("float64", 8), 12: ("uint32", 4), 13: ("uint64", 8),
               16: ("bfloat16", 2)}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                      "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3",
                      "F8_E5M2": "float8_e5m2"}
MAX_SAFETENSORS_HEADER = 64 << 20


@dataclass(frozen=True)
class FilePart:
    """One file of an artifact: path relative to its folder, size, dtype summary."""

    rel: str
    bytes: int
    dtype: str


def dtype_summary(by_bytes: Counter[str]) -> str:
    total = sum(by_bytes.values())
    if total == 0:
        return "-"
    ranked = by_bytes.most_common()
    if len(ranked) == 1:
        return ranked[0][0]
    return ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in ranked if n)


# -- protobuf wire format (only what ModelProto -> GraphProto -> TensorProto needs) ------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BundleError("ONNX graph: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise BundleError("ONNX graph: field runs past the end of its message")
            yield number, wire, buf[pos:pos + n]
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise BundleError(f"ONNX graph: unsupported protobuf wire type {wire}")


def _tensor(buf: bytes) -> tuple[str, int, str | None]:
    """``(dtype name, bytes, external file or None)`` of one TensorProto."""
    dims: list[int] = []
    dtype, raw_len, location, length = 0, None, None, None
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dims.append(int(value))
        elif number == 1 and isinstance(value, bytes):   # packed dims
            pos = 0
            while pos < len(value):
                d, pos = _varint(value, pos)
                dims.append(d)
        elif number == 2 and isinstance(value, int):
            dtype = value
        elif number == 9 and isinstance(value, bytes):
            raw_len = len(value)
        elif number == 13 and isinstance(value, bytes):
            entry = {k: v for k, _, v in _fields(value) if isinstance(v, bytes)}
            key, val = entry.get(1, b"").decode(errors="replace"), entry.get(2, b"")
            if key == "location":
                location = val.decode(errors="replace")
            elif key == "length":
                length = int(val) if val.isdigit() else None
    name, itemsize = ONNX_DTYPES.get(dtype, (f"onnx-type-{dtype}", 0))
    size = length if length is not None else raw_len
    if size is None:
        size = int(np.prod(dims, dtype=np.int64)) * itemsize if dims else itemsize
    return name, size, location


def onnx_initializers(graph: bytes) -> dict[str | None, Counter[str]]:
    """Bytes per dtype of the graph's initializers, keyed by external file (None: inline)."""
    out: dict[str | None, Counter[str]] = {}
    for number, _, value in _fields(graph):
        if number != 7 or not isinstance(value, bytes):   # ModelProto.graph
            continue
        for g_number, _, g_value in _fields(value):
            if g_number == 5 and isinstance(g_value, bytes):   # GraphProto.initializer
                dtype, size, location = _tensor(g_value)
                out.setdefault(location, Counter())[dtype] += size
    return out


def npy_dtype(path: Path) -> str:
    try:   # a memory map reads the header only
        return str(np.load(path, mmap_mode="r", allow_pickle=False).dtype)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path.name}: not a .npy file ({exc})") from exc


def safetensors_dtypes(path: Path) -> Counter[str]:
    """Bytes per dtype of a safetensors file, from its header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(f"{path.name}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise AdapterError(f"{path.name}: safetensors header length {n} exceeds the file")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{path.name}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise AdapterError(f"{path.name}: safetensors header is not a JSON object")
    out: Counter[str] = Counter()
    for name, info in table.items():
        if name == "__metadata__":
            continue
        try:
            first, last = info["data_offsets"]
            out[SAFETENSORS_DTYPES.get(info["dtype"], str(info["dtype"]))] += int(last - first)
        except (TypeError, KeyError, ValueError) as exc:
            raise AdapterError(f"{path.name}: tensor {name!r} has no valid dtype/offsets") from exc
    return out


def packet_dtypes(path: Path) -> Counter[str]:
    """Values per stored format of a SOLAR packet (signature not checked: sizes only)."""
    try:
        packet = decode_packet(path.read_bytes())
    except PacketError as exc:
        raise PacketError(f"{path.name}: {exc}") from exc
    out: Counter[str] = Counter()
    for record in packet.records:
        out[record.values.fmt.name.lower()] += record.values.count
    return out


def model_parts(graph_path: Path, manifest: dict | None = None) -> list[FilePart]:
    """The files a full-model update ships: the graph, its external data, layer weights."""
    folder = graph_path.parent
    initializers = onnx_initializers(graph_path.read_bytes())
    parts = [FilePart(graph_path.name, graph_path.stat().st_size,
                      dtype_summary(initializers.get(None, Counter())))]
    for location, dtypes in sorted((k, v) for k, v in initializers.items() if k is not None):
        path = folder / location
        if not path.is_file() or folder.resolve() not in path.resolve().parents:
            raise BundleError(f"{graph_path.name} names external data {location!r} that is "
                              f"not a file in {folder}")
        parts.append(FilePart(location, path.stat().st_size, dtype_summary(dtypes)))
    for layer in (manifest or {}).get("layers", []):
        for key in ("weight", "bias"):
            rel = layer.get("files", {}).get(key)
            if rel and rel not in {p.rel for p in parts} and (folder / rel).is_file():
                parts.append(FilePart(rel, (folder / rel).stat().st_size,
                                      npy_dtype(folder / rel)))
    return parts


def bundle_model_parts(bundle: Path) -> list[FilePart]:
    """:func:`model_parts` of a bundle folder's ``manifest.json`` graph."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
        graph = bundle / manifest["onnx"]["file"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{bundle}: no readable manifest.json naming its ONNX graph "
                          f"({exc})") from exc
    return model_parts(graph, manifest)


def parts_dtype(parts: list[FilePart]) -> str:
    """Dtype summary of several files, weighted by their bytes."""
    by: Counter[str] = Counter()
    for part in parts:
        for piece in part.dtype.split(", "):
            name, _, pct = piece.partition(" ")
            by[name] += int(part.bytes * (float(pct.rstrip("%")) / 100 if pct else 1))
    by.pop("-", None)
    return dtype_summary(by)
