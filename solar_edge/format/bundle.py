"""Read and verify an exported bundle (layout in ``docs/architecture.md``). No torch here.

:func:`load_bundle` checks, in order: ``manifest.json`` parses and has a known format
version; the stored fingerprint equals the SHA-256 of the manifest's canonical JSON
without it; every file the manifest lists stays inside the bundle, exists, has the listed
size and SHA-256; every file a layer names is listed. Any failure is a
:class:`~solar_edge.errors.BundleError` (a :class:`BundleIntegrityError` for missing or
altered files) naming the file. Every file is re-hashed on every load: there is no
shortcut, because the fingerprint that packets name is only as good as this check.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from solar_edge.errors import BundleError, BundleIntegrityError, CodecError

MANIFEST = "manifest.json"
FORMAT = "solar-edge-bundle"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def compute_fingerprint(manifest: dict[str, Any]) -> bytes:
    """Bundle fingerprint: SHA-256 of the canonical JSON of the manifest minus ``fingerprint``."""
    body = {k: v for k, v in manifest.items() if k != "fingerprint"}
    return hashlib.sha256(canonical_json(body)).digest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_relpath(rel: str) -> PurePosixPath:
    """A manifest path as a relative POSIX path that cannot leave the bundle directory."""
    p = PurePosixPath(rel)
    bad_part = any(part in ("", ".", "..") for part in p.parts)
    if not rel or p.is_absolute() or "\\" in rel or bad_part:
        raise BundleError("path in manifest escapes the bundle or is malformed", path=rel)
    return p


@dataclass(frozen=True)
class LayerBasis:
    """Stored basis of one layer: ``U`` (out x Ru), ``V`` (in x Rv), float32.

    Bundles store ``Ru == Rv == R``; the codec also accepts different ranks (e.g. complete
    bases of a rectangular weight).
    """

    layer_id: int
    U: np.ndarray
    V: np.ndarray

    def __post_init__(self) -> None:
        for name in ("U", "V"):
            m = np.asarray(getattr(self, name))
            if m.ndim != 2 or m.shape[1] < 1:
                raise CodecError(f"layer {self.layer_id}: basis {name} must be 2-D, got {m.shape}")
            if m.dtype != np.float32:
                m = m.astype(np.float32)
            object.__setattr__(self, name, m)
        if not 0 <= self.layer_id <= 0xFFFFFFFF:
            raise CodecError(f"layer id {self.layer_id} out of range")

    @property
    def out_features(self) -> int:
        return int(self.U.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.V.shape[0])


@dataclass(frozen=True)
class BundleLayer:
    """One adaptable weight ``W0`` (``out x in``) and its stored basis of rank ``rank``."""

    id: int
    name: str
    shape: tuple[int, int]
    rank: int
    basis_dtype: str
    onnx_initializer: str
    onnx_layout: str
    files: dict[str, str]
    tflite: dict[str, Any] | None
    onnx_bias: str | None = None  # the bias initializer, when the layer's bias is patchable

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


def _layer_from_dict(index: int, raw: dict[str, Any]) -> BundleLayer:
    try:
        layer = BundleLayer(
            id=int(raw["id"]),
            name=str(raw["name"]),
            shape=(int(raw["shape"][0]), int(raw["shape"][1])),
            rank=int(raw["rank"]),
            basis_dtype=str(raw["basis_dtype"]),
            onnx_initializer=str(raw["onnx"]["initializer"]),
            onnx_layout=str(raw["onnx"]["layout"]),
            files={str(k): str(v) for k, v in raw["files"].items()},
            tflite=raw.get("tflite"),
            onnx_bias=None if raw["onnx"].get("bias") is None else str(raw["onnx"]["bias"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BundleError(f"layer {index} is malformed: {exc!r}", path=MANIFEST) from exc
    if layer.id != index:
        raise BundleError(f"layer ids must be positions: layer {index} has id {layer.id}",
                          path=MANIFEST)
    if not 1 <= layer.rank <= min(layer.shape) or min(layer.shape) < 1:
        raise BundleError(f"layer {index}: rank {layer.rank} out of range for {layer.shape}",
                          path=MANIFEST)
    for key in ("weight", "U", "V"):
        if key not in layer.files:
            raise BundleError(f"layer {index}: no {key!r} file", path=MANIFEST)
    return layer


class Bundle:
    """A verified bundle on disk. Construct with :func:`load_bundle`."""

    def __init__(self, root: Path, manifest: dict[str, Any], layers: list[BundleLayer]) -> None:
        self.root = root
        self.manifest = manifest
        self.layers = layers
        self.fingerprint: bytes = bytes.fromhex(manifest["fingerprint"])
        self._by_name = {layer.name: layer for layer in layers}

    def __repr__(self) -> str:
        fp = self.fingerprint.hex()[:12]
        return f"Bundle({str(self.root)!r}, layers={len(self.layers)}, fingerprint={fp}...)"

    @property
    def profile(self) -> dict[str, Any]:
        return dict(self.manifest["profile"])

    @property
    def onnx_path(self) -> Path:
        return self.root / self.manifest["onnx"]["file"]

    @property
    def tflite_path(self) -> Path | None:
        tfl = self.manifest.get("tflite")
        return None if not tfl else self.root / tfl["file"]

    @property
    def tokenizer_dir(self) -> Path | None:
        rel = self.manifest.get("tokenizer")
        return None if not rel else self.root / rel

    def file_path(self, rel: str) -> Path:
        return self.root / safe_relpath(rel)

    def layer(self, layer_id: int) -> BundleLayer:
        if not 0 <= layer_id < len(self.layers):
            raise BundleError(f"no layer {layer_id} (bundle has {len(self.layers)})")
        return self.layers[layer_id]

    def layer_by_name(self, name: str) -> BundleLayer:
        try:
            return self._by_name[name]
        except KeyError:
            raise BundleError(f"no adaptable layer named {name!r}") from None

    def _load(self, rel: str, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
        path = self.file_path(rel)
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BundleIntegrityError(f"cannot read array: {exc}", path=rel) from exc
        if arr.shape != shape:
            raise BundleError(f"shape {arr.shape}, manifest says {shape}", path=rel)
        return arr

    def basis(self, layer_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(U, V)`` float32: ``U`` is ``out x R``, ``V`` is ``in x R``, orthonormal columns."""
        layer = self.layer(layer_id)
        u = self._load(layer.files["U"], (layer.out_features, layer.rank))
        v = self._load(layer.files["V"], (layer.in_features, layer.rank))
        return u.astype(np.float32), v.astype(np.float32)

    def layer_basis(self, layer_id: int) -> LayerBasis:
        """The codec's :class:`LayerBasis` for ``layer_id``."""
        u, v = self.basis(layer_id)
        return LayerBasis(layer_id, u, v)

    def singular_values(self, layer_id: int) -> np.ndarray:
        """The top ``R`` singular values of ``W0`` (float32, descending), if stored."""
        layer = self.layer(layer_id)
        if "S" not in layer.files:
            raise BundleError(f"layer {layer_id}: no singular values stored")
        return self._load(layer.files["S"], (layer.rank,)).astype(np.float32)

    def base_bias(self, layer_id: int) -> np.ndarray | None:
        """The layer's base bias (``out`` float32, read-only), None when it has none the
        runtime can patch."""
        layer = self.layer(layer_id)
        if "bias" not in layer.files:
            return None
        return self._load(layer.files["bias"], (layer.out_features,), mmap=True)

    def head_part(self, name: str) -> np.ndarray | None:
        """A base-model tensor a task head reads (e.g. ``pooler.dense.weight``), if exported."""
        rel = (self.manifest.get("head_parts") or {}).get(name)
        if rel is None:
            return None
        arr = np.load(self.file_path(rel), allow_pickle=False)
        return np.asarray(arr, np.float32)

    def base_weight(self, layer_id: int) -> np.ndarray:
        """Pristine ``W0`` (``out x in`` float32), memory-mapped read-only.

        Stored in Fortran order, so ``base_weight(l).T`` is a C-contiguous ``in x out``
        view whose bytes are exactly the ONNX initializer (``layout == "in_out"``).
        """
        layer = self.layer(layer_id)
        arr = self._load(layer.files["weight"], layer.shape, mmap=True)
        if arr.dtype != np.float32:
            raise BundleError(f"dtype {arr.dtype}, expected float32", path=layer.files["weight"])
        return arr


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError("bundle directory does not exist", path=str(root))
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise BundleIntegrityError("missing", path=MANIFEST) from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot parse: {exc}", path=MANIFEST) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"not a {FORMAT} manifest", path=MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}",
            path=MANIFEST,
        )
    for key in ("fingerprint", "files", "layers", "onnx", "profile", "model"):
        if key not in manifest:
            raise BundleError(f"missing key {key!r}", path=MANIFEST)
    return manifest


def verify_files(root: Path, files: dict[str, Any]) -> None:
    """Check every listed file: inside the bundle, present, right size, right SHA-256."""
    for rel in sorted(files):
        entry = files[rel]
        path = root / safe_relpath(rel)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BundleIntegrityError("missing", path=rel) from None
        if not path.is_file():
            raise BundleIntegrityError("not a regular file", path=rel)
        if size != int(entry["bytes"]):
            raise BundleIntegrityError(f"size {size}, manifest says {entry['bytes']}", path=rel)
        if sha256_file(path) != entry["sha256"]:
            raise BundleIntegrityError("SHA-256 does not match the manifest", path=rel)


def load_bundle(path: str | Path) -> Bundle:
    """Open and fully verify the bundle at ``path``."""
    root = Path(path)
    manifest = _read_manifest(root)
    try:
        stored = bytes.fromhex(manifest["fingerprint"])
    except (TypeError, ValueError) as exc:
        raise BundleError("fingerprint is not hex", path=MANIFEST) from exc
    if stored != compute_fingerprint(manifest):
        raise BundleIntegrityError("fingerprint does not match the manifest contents",
                                   path=MANIFEST)
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError("'files' must be an object", path=MANIFEST)
    verify_files(root, files)
    layers = [_layer_from_dict(i, raw) for i, raw in enumerate(manifest["layers"])]
    names = [layer.name for layer in layers]
    if names != sorted(names) or len(set(names)) != len(names):
        raise BundleError("layers must be unique and sorted by name", path=MANIFEST)
    referenced = [manifest["onnx"]["file"]]
    if manifest["onnx"].get("data"):
        referenced.append(manifest["onnx"]["data"])
    referenced += [rel for layer in layers for rel in layer.files.values()]
    for layer in layers:
        for key in ("input_scale", "input_shift"):
            if layer.tflite and layer.tflite.get(key):
                referenced.append(str(layer.tflite[key]))
    if manifest.get("tflite"):
        referenced.append(manifest["tflite"]["file"])
    head_parts = manifest.get("head_parts") or {}
    if not isinstance(head_parts, dict):
        raise BundleError("'head_parts' must be an object", path=MANIFEST)
    referenced += [str(rel) for rel in head_parts.values()]
    for rel in referenced:
        if rel not in files:
            raise BundleIntegrityError("referenced but not listed with a hash", path=rel)
    return Bundle(root, manifest, layers)
