"""Task heads in torch, from what a packet's metadata says (the board builds the same ones).

Today one kind: the project's frozen seeded head (``labels`` + ``head_seed``, regenerated
with the PRNG by :func:`solar_edge.regen.heads.task_head`): logits are
``LOGIT_SCALE * unit(features) @ H.T``. An adapter without a head has no logits; the steps
that need them say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from solar_edge.exporters.calibration import Head
from solar_edge.exporters.families.base import unit
from solar_edge.regen.heads import LOGIT_SCALE, task_head


def seeded_head(head_seed: int, num_labels: int, hidden: int) -> torch.Tensor:
    """The seeded head matrix ``H`` (``num_labels x hidden``) as a torch tensor."""
    return torch.from_numpy(task_head(head_seed, num_labels, hidden))


def head_for(metadata: Mapping[str, Any], hidden: int) -> Head | None:
    """``features -> logits`` of the adapter's task head, or None when it has none."""
    labels = metadata.get("labels")
    if not labels or "head_seed" not in metadata:
        return None
    weight = seeded_head(int(metadata["head_seed"]), len(labels), hidden)
    return lambda features: LOGIT_SCALE * unit(features) @ weight.T
