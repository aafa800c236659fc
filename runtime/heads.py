"""Task heads on the board, built from a packet's metadata (the server builds the same ones).

Today one kind: the project's frozen seeded head (``labels`` + ``head_seed``), regenerated
with the PRNG (:func:`solar_edge.regen.heads.task_head`): logits are
``LOGIT_SCALE * unit(features) @ H.T``. A packet without a head serves embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from solar_edge.regen.heads import LOGIT_SCALE, task_head


def unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the embedding a model serves without a head)."""
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return (features / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


@dataclass(frozen=True)
class SeededHead:
    labels: list[str]
    weight: np.ndarray  # (num_labels, hidden)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return (np.float32(LOGIT_SCALE) * unit(features) @ self.weight.T).astype(np.float32)


def head_from_metadata(metadata: Mapping[str, Any], hidden: int) -> SeededHead | None:
    labels = metadata.get("labels")
    if not labels or "head_seed" not in metadata:
        return None
    return SeededHead(list(labels), task_head(int(metadata["head_seed"]), len(labels), hidden))
