"""Frozen task heads regenerated from the PRNG, so packets carry no head weights.

The project's classification adapters are trained with a fixed head ``H``
(``num_labels x hidden``) whose entries are Rademacher signs scaled by ``1/sqrt(hidden)``,
drawn from the stream ``(head_seed, HEAD_LAYER_ID, 0)``. Logits are
``LOGIT_SCALE * unit(features) @ H.T`` (features: the model family's pooled output).
Training and compression (torch, :mod:`solar_edge.exporters.heads`) and the board
(:mod:`solar_edge.runtime.heads`) both build ``H`` here, so they agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from solar_edge.format.records import PerturbationKind
from solar_edge.regen.prng import perturbation_columns

HEAD_LAYER_ID = 0xFFFFFFFF
LOGIT_SCALE = 20.0


def task_head(head_seed: int, num_labels: int, hidden: int) -> np.ndarray:
    """The ``(num_labels, hidden)`` float32 head matrix for ``head_seed``."""
    if num_labels < 1 or hidden < 1:
        raise ValueError("num_labels and hidden must be positive")
    signs = perturbation_columns(
        head_seed, HEAD_LAYER_ID, 0, hidden, np.arange(num_labels), PerturbationKind.RADEMACHER
    )
    return (signs.T / np.float32(np.sqrt(np.float32(hidden)))).astype(np.float32)
