"""Family ``generic`` on the board: arrays in, the graph's first output as hidden states.

For bundles exported from a ``module:function`` (nothing is known of what their inputs mean).
The health input is zeros of each graph input's dtype, with symbolic axes set to 1 (batch)
or a short length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from solar_edge.errors import BundleError, RuntimeApplyError

NAME = "generic"
SYMBOLIC_LENGTH = 8


def _zeros(spec: Mapping[str, Any]) -> np.ndarray:
    shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else SYMBOLIC_LENGTH)
             for i, d in enumerate(spec.get("shape", []))]
    try:
        dtype = np.dtype(str(spec.get("dtype", "float32")))
    except TypeError as exc:
        raise BundleError(f"graph input {spec.get('name')!r} has dtype {spec.get('dtype')!r}",
                          path="manifest.json") from exc
    return np.zeros(shape, dtype)


class GenericFamily:
    name = NAME

    def __init__(self, graph_inputs: Sequence[Mapping[str, Any]]) -> None:
        self.health_input = {str(row["name"]): _zeros(row) for row in graph_inputs}

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise RuntimeApplyError("this bundle's model (exported from module:function) takes "
                                    "arrays, not text: feed it from Python, "
                                    "EdgeRuntime.infer({input name: array})")
        return {str(k): np.asarray(v) for k, v in inputs.items()}

    def hidden(self, outputs: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        return np.asarray(outputs[0]), None
