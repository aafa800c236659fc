"""Build ``manifest.json``: file hashes over the whole bundle and the fingerprint.

The manifest holds no timestamps and no absolute paths, so exporting the same model for
the same profile twice gives the same fingerprint wherever the graph bytes are the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from solar_edge.format.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    compute_fingerprint,
    sha256_file,
)


def layer_file_names(layer_id: int, has_bias: bool = False) -> dict[str, str]:
    """Relative paths of a layer's files (``NNNN`` = zero-padded layer id)."""
    stem = f"{layer_id:04d}"
    files = {
        "weight": f"weights/{stem}.npy",
        "U": f"basis/{stem}.U.npy",
        "V": f"basis/{stem}.V.npy",
        "S": f"basis/{stem}.S.npy",
    }
    if has_bias:
        files["bias"] = f"weights/{stem}.bias.npy"
    return files


def write_head_parts(root: Path, parts: dict[str, np.ndarray]) -> dict[str, str]:
    """Base-model tensors a task head may use (e.g. BERT's ``pooler.dense.weight``), written
    to ``heads/<name>.npy``; returns name -> relative path."""
    out = {}
    for name, value in sorted(parts.items()):
        rel = f"heads/{name}.npy"
        (root / "heads").mkdir(exist_ok=True)
        np.save(root / rel, np.asarray(value, np.float32), allow_pickle=False)
        out[name] = rel
    return out


def onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Graph inputs/outputs: name, element type, shape (ints or symbolic names)."""
    model = onnx.load(str(path), load_external_data=False)

    def rows(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            elem = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append({"name": v.name, "dtype": elem, "shape": dims})
        return out

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": rows(v for v in model.graph.input if v.name not in inits),
            "outputs": rows(model.graph.output)}


def file_entries(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` except the manifest: POSIX path -> size and SHA-256."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def finalize(body: dict[str, Any], root: Path) -> dict[str, Any]:
    """Add format, file hashes and fingerprint to ``body``; returns the full manifest."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body}
    manifest["files"] = file_entries(root)
    manifest.pop("fingerprint", None)
    manifest["fingerprint"] = compute_fingerprint(manifest).hex()
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
    (root / MANIFEST).write_text(text + "\n", encoding="utf-8")
