"""Family ``vit``: a transformers ViT (``model_type: vit``) over ``pixel_values``.

The exported graph is the base ``ViTModel`` without its pooler (as inside
``ViTForImageClassification``): ``pixel_values (N, C, H, W) -> last_hidden_state``, whose
first position feeds a classifier head (``classifier(h[CLS])``, PEFT ``modules_to_save``).
The directory may hold a ``ViTModel`` or a ``ViTForImageClassification`` checkpoint.
Preprocessing comes from the directory's ``preprocessor_config.json`` (``image_mean``,
``image_std``, ``rescale_factor``; transformers' defaults otherwise) and the config's
``image_size`` and ``num_channels``; the export records it in the manifest
(``model.image``) and the board applies it (:mod:`solar_edge.runtime.images`). The board
side is :mod:`solar_edge.runtime.families.vit`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from solar_edge.errors import ExportError

from .base import LoadedModel
from .text_encoder import quiet_loading

NAME = "vit"
PREPROCESSOR = "preprocessor_config.json"


def claims(path: Path) -> bool:
    """Whether ``path`` is a transformers directory of a ViT."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "vit"


def image_spec(path: Path, config: Any) -> Any:
    from solar_edge.runtime.images import ImageSpec

    pre: dict[str, Any] = {}
    if (path / PREPROCESSOR).is_file():
        try:
            pre = json.loads((path / PREPROCESSOR).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ExportError(f"{path / PREPROCESSOR}: not JSON ({exc})") from exc
    channels = int(config.num_channels)
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def per_channel(key: str) -> tuple[float, ...]:
        value = pre.get(key, 0.5)
        values = [float(value)] * channels if isinstance(value, (int, float)) else \
            [float(v) for v in value]
        if len(values) != channels:
            raise ExportError(f"{PREPROCESSOR}: {key} has {len(values)} values for "
                              f"{channels} channels")
        return tuple(values)

    rescale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
    return ImageSpec(height, width, channels, per_channel("image_mean"),
                     per_channel("image_std"), rescale)


def canary_images(height: int, width: int, channels: int) -> list[list[Any]]:
    """Three fixed images (a ramp, a checkerboard, a disc) as nested lists of 0-255 ints."""
    y, x = np.mgrid[0:height, 0:width]
    ramp = (255 * (x + y) / max(1, height + width - 2))
    checker = 255.0 * (((x // 2) + (y // 2)) % 2)
    disc = 255.0 * (((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(height, width) / 3) ** 2)
    out = []
    for plane in (ramp, checker, disc):
        image = np.repeat(np.rint(plane).astype(np.int64)[:, :, None], channels, axis=2)
        out.append(image.tolist())
    return out


class VitModel:
    """:class:`~.base.TorchModel` of a ViT: raw images in, as the board preprocesses them."""

    def __init__(self, module: nn.Module, spec: Any) -> None:
        self.module = module
        self.spec = spec
        config: Any = module.config
        self.hidden_size = int(config.hidden_size)
        patch = config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        self.positions = (spec.height // ph) * (spec.width // pw) + 1   # patches + [CLS]

    def feeds(self, inputs: Sequence[Any], max_len: int = 0) -> dict[str, torch.Tensor]:
        from solar_edge.runtime.images import pixel_values

        return {"pixel_values": torch.from_numpy(pixel_values(list(inputs), self.spec))}

    def token_mask(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every position is real input (no padding); computed without running the model,
        whose layers may carry calibration hooks."""
        return torch.ones((feeds["pixel_values"].shape[0], self.positions), dtype=torch.bool)

    def hidden(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.module(**feeds).last_hidden_state
        return states, torch.ones(states.shape[:2], dtype=torch.long)


def _load(path: Path) -> tuple[nn.Module, Any]:
    from transformers import ViTConfig, ViTModel

    if not claims(path):
        raise ExportError(f"{path} is not a transformers ViT directory (config.json "
                          "model_type 'vit')")
    try:
        with quiet_loading():
            config = ViTConfig.from_pretrained(path)
            module = ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load a ViT from {path}: {exc}") from exc
    return module, config


def open_model(path: Path) -> VitModel:
    """The ViT of ``path`` in eval mode, for calibration and refits."""
    module, config = _load(path)
    return VitModel(module, image_spec(path, config))


def load_for_export(path: Path, name: str | None = None) -> LoadedModel:
    module, config = _load(path)
    spec = image_spec(path, config)
    canaries = canary_images(spec.height, spec.width, spec.channels)
    model = VitModel(module, spec)
    inputs = model.feeds(canaries[:2])
    identity = {
        "name": name or path.name,
        "kind": "transformers",
        "family": NAME,
        "model_type": "vit",
        "hidden_size": int(config.hidden_size),
        "parameters": int(sum(p.numel() for p in module.parameters())),
        "image": spec.to_dict(),
    }
    return LoadedModel(module, inputs, identity, "last_hidden_state", [], {}, canaries)
