"""Family ``vit`` on the board: images -> ``pixel_values``; hidden states out, no mask.

Inputs are raw images (arrays, see :func:`solar_edge.runtime.images.pixel_values`),
preprocessed as the manifest's ``model.image`` says. The graph's first output is the
transformer's ``last_hidden_state`` (after its final layer norm); a classifier head reads
its first position (the ``[CLS]`` token), as ``ViTForImageClassification`` does. The server
side is :mod:`solar_edge.exporters.families.vit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from solar_edge.errors import BundleError
from solar_edge.runtime.images import ImageSpec, pixel_values

NAME = "vit"
INPUT = "pixel_values"


class VitFamily:
    name = NAME

    def __init__(self, model: Mapping[str, Any], input_names: Sequence[str]) -> None:
        if list(input_names) != [INPUT]:
            raise BundleError(f"a vit bundle's graph takes {INPUT!r}, not {list(input_names)}",
                              path="manifest.json")
        self.spec = ImageSpec.from_manifest(model)
        gray = np.full((self.spec.height, self.spec.width, self.spec.channels), 128, np.uint8)
        self.health_input: list[np.ndarray] = [gray]

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """One image array (2-D or 3-D) or a list of them (canary inputs: nested lists)."""
        if isinstance(inputs, np.ndarray) and inputs.ndim in (2, 3):
            inputs = [inputs]
        return {INPUT: pixel_values(list(inputs), self.spec)}

    def hidden(self, outputs: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        return np.asarray(outputs[0]), None
