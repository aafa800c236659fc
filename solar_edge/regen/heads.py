"""Frozen task heads regenerated from the PRNG, so packets carry no head weights.

A classification adapter is trained with a fixed head ``H`` (``num_labels x hidden``)
whose entries are Rademacher signs scaled by ``1/sqrt(hidden)``, drawn from the stream
``(head_seed, HEAD_LAYER_ID, 0)``. Logits are ``LOGIT_SCALE * normalize(pooled) @ H.T``
where ``pooled`` is the attention-masked mean of the last hidden state (the sentence
embedding of MiniLM). Training scripts (torch) and the runtime (numpy) both build ``H``
here, so they agree bit for bit.
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


def mean_pool(hidden_states: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean over tokens: ``(batch, seq, hidden) -> (batch, hidden)``."""
    mask = attention_mask.astype(np.float32)[..., None]
    summed = (hidden_states.astype(np.float32) * mask).sum(axis=1)
    return summed / np.maximum(mask.sum(axis=1), np.float32(1e-9))


def head_logits(pooled: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Cosine-style logits: ``LOGIT_SCALE * normalize(pooled) @ head.T``."""
    norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
    unit = pooled / np.maximum(norms, np.float32(1e-12))
    return (np.float32(LOGIT_SCALE) * unit @ head.T).astype(np.float32)
