"""Images on the board: read PNG / JPEG / ``.npy`` files and turn them into pixel values.

Files are recognised by their first bytes, not their names. PNG is decoded by
:mod:`solar_edge.runtime.png` (zlib + numpy); JPEG needs Pillow (the ``image`` extra); a
``.npy`` holds a ``(height, width)`` or ``(height, width, channels)`` array of raw pixel
values on the same scale as the model's images (0-255 for 8-bit ones).

The model's preprocessing (:class:`ImageSpec`, recorded by the export in the manifest's
``model.image``) is ``(pixel * rescale - mean) / std`` per channel, channels first. The
board does not resize or convert colours: an image of another size or channel count is an
:class:`~solar_edge.errors.ImageError` naming what the model takes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from solar_edge.errors import BundleError, ImageError
from solar_edge.runtime.png import SIGNATURE as PNG_SIGNATURE
from solar_edge.runtime.png import decode_png

MAX_FILE_BYTES = 64 << 20
SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")   # what a folder batch picks up
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
CHANNEL_NAMES = {1: "grayscale", 2: "grayscale + alpha", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class ImageSpec:
    """What the model's graph takes: ``channels x height x width`` after preprocessing."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float = 1 / 255

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(mean=list(self.mean), std=list(self.std), layout="NCHW", resize=False)
        return out

    @classmethod
    def from_manifest(cls, model: Mapping[str, Any]) -> ImageSpec:
        raw: Any = model.get("image")
        try:
            spec = cls(int(raw["height"]), int(raw["width"]), int(raw["channels"]),
                       tuple(float(x) for x in raw["mean"]),
                       tuple(float(x) for x in raw["std"]), float(raw["rescale"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise BundleError(f"the manifest's model.image preprocessing is missing or "
                              f"malformed ({exc!r})", path="manifest.json") from exc
        if (min(spec.height, spec.width, spec.channels) < 1 or len(spec.mean) != spec.channels
                or len(spec.std) != spec.channels or min(spec.std) <= 0):
            raise BundleError(f"model.image preprocessing {raw} is inconsistent",
                              path="manifest.json")
        return spec


class NamedImage(np.ndarray):
    """A pixel array that knows the file it came from (for messages)."""

    name: str = "image"


def _channels_last(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image


def pixel_values(images: Sequence[Any], spec: ImageSpec,
                 names: Sequence[str] | None = None) -> np.ndarray:
    """Raw images (``(H, W)`` or ``(H, W, C)``) -> ``(N, C, H, W)`` float32 graph input."""
    if not len(images):
        raise ImageError("no images")
    out = np.empty((len(images), spec.channels, spec.height, spec.width), np.float32)
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    for i, raw in enumerate(images):
        name = names[i] if names is not None else getattr(raw, "name", f"image {i}")
        image = np.asarray(raw)
        if image.dtype.kind not in "uif" or image.ndim not in (2, 3):
            raise ImageError(f"{name}: expected a (height, width[, channels]) array of numbers, "
                             f"got {image.dtype} of shape {list(image.shape)}")
        image = _channels_last(image)
        h, w, c = image.shape
        if c != spec.channels:
            raise ImageError(f"{name}: {c} channels ({CHANNEL_NAMES.get(c, 'unknown')}); this "
                             f"model takes {spec.channels} "
                             f"({CHANNEL_NAMES.get(spec.channels, '?')})")
        if (h, w) != (spec.height, spec.width):
            raise ImageError(f"{name}: {w}x{h} pixels; this model takes "
                             f"{spec.width}x{spec.height} (the board does not resize)")
        values = image.astype(np.float32).transpose(2, 0, 1)
        if not np.isfinite(values).all():
            raise ImageError(f"{name}: non-finite pixel values")
        out[i] = (values * np.float32(spec.rescale) - mean) / std
    return out


def _jpeg(data: bytes, name: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImageError(f"{name}: decoding JPEG needs Pillow (pip install "
                         "'solar-edge[image]'); PNG and .npy need nothing") from exc
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            im = opened if opened.mode in ("L", "RGB") else opened.convert("RGB")
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: unreadable JPEG ({exc})") from exc


def _npy(data: bytes, name: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImageError(f"{name}: unreadable .npy ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise ImageError(f"{name}: a .npy image must hold one array")
    return array


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """PNG, JPEG or ``.npy`` bytes -> raw pixel array, by content."""
    if data.startswith(PNG_SIGNATURE):
        return decode_png(data, name)
    if data.startswith(JPEG_MAGIC):
        return _jpeg(data, name)
    if data.startswith(NPY_MAGIC):
        return _npy(data, name)
    raise ImageError(f"{name}: not a PNG, JPEG or .npy image (starts with {data[:8]!r})")


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{path}: {size} bytes, larger than {MAX_FILE_BYTES >> 20} MiB")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from exc
    return decode_image(data, str(path))


def image_paths(path: str | Path) -> list[Path]:
    """A file itself, or a folder's PNG / JPEG / ``.npy`` files sorted by name."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not found:
        raise ImageError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    return found


def read_images(paths: Sequence[str | Path]) -> tuple[list[str], list[np.ndarray]]:
    """Every image of ``paths`` (files, or folders expanded by :func:`image_paths`), decoded;
    each array is a :class:`NamedImage` carrying its file name."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for given in paths:
        for path in image_paths(given):
            image = read_image(path).view(NamedImage)
            image.name = str(path)
            names.append(str(path))
            images.append(image)
    return names, images
