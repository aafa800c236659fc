"""Update digests: a packet says, signed, what its decoded update is, checked without a
forward pass.

The output canary (:mod:`solar_edge.regen.canary`) vouches for what the served model outputs,
which costs the board a forward pass per apply. The update digest vouches for what the board
decoded instead: every layer's ``dW = L @ Rt.T``, its DoRA row scale and bias delta, and the
task head. With the bundle's files hashed on every load (the base weights and graph are
what the exporter wrote) and a mechanism that serves the factors as they are (the ``lora``
slots), that fixes what serves, and checking it costs a few small products per layer.

The digest has :data:`ROWS` rows of :data:`canary.DIGEST_DIMS` numbers, each a sum over
layers of Rademacher projections (per-layer vectors from the project's PRNG, so a layer's
update landing on another layer of the same shape changes the digest):

* row 0: ``sum_l p_l,j . (dW_l u_l,j)``, computed as ``L (Rt.T u)``: ``(out + in) k`` flops;
* row 1: ``sum_l p_l,j . ((s_l - 1) + db_l)``: the row scales and bias deltas;
* row 2: the head's logits on a fixed pseudo-random hidden state, projected (zeros without
  a head).

Rounded to :data:`canary.DIGEST_DIGITS` significant digits, compared row by row relative to
the row's largest expected magnitude (plus :data:`FLOOR`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from solar_edge.format.records import PerturbationKind
from solar_edge.regen.canary import DIGEST_DIGITS, DIGEST_DIMS, compare
from solar_edge.regen.prng import perturbation_columns

DIGEST_SEED = 0x5AFE_D16E
HEAD_LAYER_ID = 0xFFFFFFFD
ROWS = 3
DEFAULT_TOLERANCE = 1e-3  # float32 decoding differs across BLAS builds by ~1e-6 relative
FLOOR = 1e-9              # rows that are all zero (no scales, no head) must stay zero


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's decoded change, as the digest reads it."""

    layer_id: int
    factors: tuple[np.ndarray, np.ndarray] | None  # (L: out x k, Rt: in x k)
    scale: np.ndarray | None                       # (out,) DoRA row scale
    bias: np.ndarray | None                        # (out,) bias delta


def probe_vectors(layer_id: int, width: int, stream: int) -> np.ndarray:
    """``width x DIGEST_DIMS`` ±1 float64 columns for ``layer_id`` (stream 0: outputs, 1:
    inputs)."""
    signs = perturbation_columns(DIGEST_SEED, layer_id, stream, width,
                                 np.arange(DIGEST_DIMS), PerturbationKind.RADEMACHER)
    return signs.astype(np.float64)


@lru_cache(maxsize=4)
def head_probe(hidden: int) -> np.ndarray:
    """The fixed ``(1, 2, hidden)`` hidden state the head's row is computed on (read-only)."""
    signs = perturbation_columns(DIGEST_SEED, HEAD_LAYER_ID, 0, 2 * hidden, np.arange(1),
                                 PerturbationKind.RADEMACHER)
    probe = signs.reshape(1, 2, hidden).astype(np.float32)
    probe.flags.writeable = False
    return probe


class ProbeCache:
    """Probe vectors per (layer, width, stream), generated once and reused across applies."""

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, int, int], np.ndarray] = {}

    def __call__(self, layer_id: int, width: int, stream: int) -> np.ndarray:
        key = (layer_id, width, stream)
        vec = self._vectors.get(key)
        if vec is None:
            vec = self._vectors[key] = probe_vectors(layer_id, width, stream)
        return vec


def digest(updates: Iterable[LayerUpdate], head_logits: np.ndarray | None,
           vectors: ProbeCache | None = None) -> list[list[float]]:
    """The :data:`ROWS` x :data:`canary.DIGEST_DIMS` digest (JSON-ready, rounded)."""
    vectors = vectors or ProbeCache()
    rows = np.zeros((ROWS, DIGEST_DIMS))
    for up in updates:
        if up.factors is not None:
            p = vectors(up.layer_id, up.factors[0].shape[0], 0)
            u = vectors(up.layer_id, up.factors[1].shape[0], 1)
            rows[0] += np.einsum("oj,oj->j", p, _update_times(up.factors, u))
        for change in (None if up.scale is None else up.scale - 1.0, up.bias):
            if change is not None:
                change = np.asarray(change, np.float64)
                rows[1] += change @ vectors(up.layer_id, change.shape[0], 0)
    if head_logits is not None:
        logits = np.asarray(head_logits, np.float64).reshape(-1)
        rows[2] = logits @ vectors(HEAD_LAYER_ID, logits.shape[0], 1)
    return [[float(f"{v:.{DIGEST_DIGITS}g}") for v in row] for row in rows]


def _update_times(factors: tuple[np.ndarray, np.ndarray], u: np.ndarray) -> np.ndarray:
    """``dW u`` as ``L (Rt.T u)``: float32 products (±1 vectors are exact in float32; about
    1e-6 relative error against a tolerance of 1e-3), again in float64 where float32
    overflows (a huge update still gets a finite digest, and the growth check its probe)."""
    left, right_t = (np.asarray(f, np.float32) for f in factors)
    with np.errstate(over="ignore", invalid="ignore"):
        y = left @ (right_t.T @ u.astype(np.float32))
    if np.isfinite(y).all() or not (np.isfinite(left).all() and np.isfinite(right_t).all()):
        return y.astype(np.float64)
    return np.asarray(left, np.float64) @ (np.asarray(right_t, np.float64).T @ u)


def mismatch(got: list[list[float]], expected: list[list[float]],
             tolerance: float) -> str | None:
    """None when the digests agree within ``tolerance``, else what differs."""
    problem = compare(got, expected, tolerance, FLOOR)
    return None if problem is None else f"values {problem}"
