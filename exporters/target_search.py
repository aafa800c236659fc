"""The smallest packet whose measured accuracy drop is within a target (``--max-drop``).

Packets are measured as a board serves them: each candidate is applied to a real
:class:`~solar_edge.runtime.engine.EdgeRuntime` on the bundle and answers the evaluation
texts. The reference is the uncompressed adapter served the same way (a lossless packet of
float32 factors and extras). The drop, in points, is, with labelled texts, the share of texts
the reference classifies right and the packet gets wrong (``100 * lost / n``); texts the
packet gets right where the reference did not do not pay for the ones it lost, so a packet
passes on what it keeps, not on a lucky balance of errors (the net accuracy change alone
swings by several points between two samples of a few hundred texts). Without labels it is
``100 - agreement`` (agreement: the share of texts where the packet's prediction equals the
reference's); without a head, ``100 * (1 - mean cosine)``. A decoder (``causal-lm``
bundle) is measured per position: its prediction is the next token, and the drop is
``100 - agreement`` over every position of every text (a packet that predicts other tokens
generates other text, right or wrong); the accuracy reported is next-token accuracy against
the texts' own tokens, and the cosine of a decoder's outputs is not measured (None).

The search walks budgets up a doubling ladder from the smallest useful one until a packet
passes, then bisects between the last failing and the first passing budget. The plain
candidates smaller than its pick (every layer at one rank and 3, 4 or 8 bits from the codec's
own fits, and the plain baselines as anyone would make them: the adapter's own factors at
int8/int4/int3, rank re-truncation at int4/int8; at most ``MAX_PLAIN`` of them, the largest
ones) are then measured too, smallest first, and the first that passes is the packet instead
(:func:`plain_within`): the smallest packet within the target, whichever method makes it.
Every point measured is returned as the curve, so a user sees the trade-off it walked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from solar_edge.errors import BudgetError, CalibrationError, CodecError, GenerationError
from solar_edge.format import signing
from solar_edge.runtime.families.causal_lm import NAME as DECODER_FAMILY

MAX_POINTS = 12
BISECT_STEPS = 3
MAX_PLAIN = 8
DECODER_MAX_TOKENS = 256       # per text, when the bundle does not state its positions


@dataclass(frozen=True)
class Measured:
    predictions: np.ndarray      # argmax labels (classification) or -1 (embeddings); for a
    #                              decoder the next token at every position of every text
    outputs: np.ndarray | None   # logits or unit embeddings (None: a decoder's)
    accuracy: float | None       # with labels
    correct: np.ndarray | None = None  # per text, with labels


@dataclass(frozen=True)
class CurvePoint:
    budget: int
    nbytes: int
    agreement: float | None      # % of texts predicted as the reference does (None:
    #                              embeddings, which have no prediction to agree on)
    cosine: float | None         # mean cosine to the reference's outputs (None: decoder)
    accuracy: float | None
    drop: float                  # points (see the module docstring)
    method: str = "codec"        # or "plain r<k>-int<b>" (every layer at one rank and width
    #                              from the codec's fits), "plain baseline own-int3" /
    #                              "plain baseline r<k>-int<b>" (the baselines as they are)

    def row(self) -> dict:
        return {"budget": self.budget, "bytes": self.nbytes, "agreement": self.agreement,
                "cosine": self.cosine, "accuracy": self.accuracy, "drop": self.drop,
                "method": self.method}


class BoardMeter:
    """Measures packets on one runtime with a throwaway trusted key (the final packet is
    signed with the user's key afterwards)."""

    def __init__(self, bundle_dir: str, texts: Sequence[str], labels: Sequence[int] | None
                 ) -> None:
        from solar_edge.runtime.engine import EdgeRuntime

        self.key = signing.generate_private_key()
        self.runtime = EdgeRuntime(bundle_dir, [self.key.public_key()])
        self.texts, self.labels = list(texts), None if labels is None else np.asarray(labels)
        self.count = 0

    def measure(self, packet: bytes) -> Measured:
        self.runtime.apply(packet)
        if self.runtime.family.name == DECODER_FAMILY:
            return self._next_tokens()
        outputs = np.concatenate([self.runtime.infer(self.texts[i:i + 64])
                                  for i in range(0, len(self.texts), 64)])
        has_head = self.runtime.active is not None and self.runtime.active.labels is not None
        predictions = outputs.argmax(-1) if has_head else np.full(len(outputs), -1)
        accuracy = correct = None
        if self.labels is not None and has_head:
            correct = predictions == self.labels
            accuracy = float(correct.mean() * 100)
        return Measured(predictions, outputs, accuracy, correct)

    def _next_tokens(self) -> Measured:
        """Every text's next-token predictions, and their accuracy against its own next
        tokens (the first ``max_positions`` tokens of each; a one-token text has none)."""
        family = self.runtime.family
        limit = family.max_positions or DECODER_MAX_TOKENS
        predicted, correct = [], []
        for text in self.texts:
            try:
                ids = np.asarray(family.encode(text)[:limit], np.int64)
            except GenerationError:  # encodes to no tokens
                continue
            if ids.size < 2:
                continue
            logits = self.runtime.run_graph(family.step_feeds(ids[None], 0, None))[0][0, :-1]
            predicted.append(logits.argmax(-1))
            correct.append(predicted[-1] == ids[1:])
        if not predicted:
            raise CalibrationError("the evaluation texts have no next token to predict "
                                   "(each encodes to fewer than 2 tokens)")
        hits = np.concatenate(correct)  # reported; the drop is on agreement (module doc)
        return Measured(np.concatenate(predicted), None, float(hits.mean() * 100))

    def next_version(self) -> int:
        self.count += 1
        return self.count


def compare(point: Measured, reference: Measured, budget: int, nbytes: int,
            method: str = "codec") -> CurvePoint:
    agree = float((point.predictions == reference.predictions).mean() * 100)
    cos = None
    if point.outputs is not None and reference.outputs is not None:
        a, b = point.outputs.astype(np.float64), reference.outputs.astype(np.float64)
        cos = float(np.mean((a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1)
                                                        * np.linalg.norm(b, axis=-1), 1e-12)))
    if point.correct is not None and reference.correct is not None:
        drop = float((reference.correct & ~point.correct).mean() * 100)
    elif (reference.predictions >= 0).any():
        drop = 100.0 - agree
    else:  # embeddings: the drop is the lost cosine, in points
        assert cos is not None  # embeddings always have outputs
        return CurvePoint(budget, nbytes, None, cos, point.accuracy, 100.0 * (1.0 - cos),
                          method)
    return CurvePoint(budget, nbytes, agree, cos, point.accuracy, drop, method)


def search(build: Callable[[int], bytes], measure: Callable[[bytes], Measured],
           reference: Measured, max_drop: float, lo: int, hi: int,
           on_point: Callable[[CurvePoint], None] | None = None, size_offset: int = 0,
           ) -> tuple[int, list[CurvePoint]]:
    """``build(budget) -> packet`` (signed with the meter's key); returns the smallest passing
    budget and every point measured. Raises BudgetError when even ``hi`` misses the target.
    ``size_offset``: what the final packet adds to a measured one (its signed digests)."""
    if not max_drop >= 0:
        raise CodecError(f"max_drop must be >= 0, got {max_drop}")
    curve: list[CurvePoint] = []
    cache: dict[int, CurvePoint] = {}

    def point(budget: int) -> CurvePoint | None:
        if budget not in cache:
            try:
                data = build(budget)
            except BudgetError:
                return None
            cache[budget] = compare(measure(data), reference, budget, len(data) + size_offset)
            curve.append(cache[budget])
            if on_point is not None:
                on_point(cache[budget])
        return cache[budget]

    failing, budget = lo, lo
    passing: int | None = None
    while len(curve) < MAX_POINTS:
        p = point(budget)
        if p is not None and p.drop <= max_drop:
            passing = budget
            break
        failing = budget
        if budget >= hi:
            break
        budget = min(hi, budget * 2)
    if passing is None:
        best = min(curve, key=lambda c: c.drop) if curve else None
        raise BudgetError(f"no packet up to {hi} B keeps the drop within {max_drop:g} points"
                          + (f" (best: {best.drop:.2f} at {best.nbytes} B)" if best else ""))
    for _ in range(BISECT_STEPS):
        mid = (failing + passing) // 2
        if passing - failing <= max(64, passing // 20) or len(curve) >= MAX_POINTS:
            break
        p = point(mid)
        if p is not None and p.drop <= max_drop:
            passing = mid
        else:
            failing = mid
    return passing, sorted(curve, key=lambda c: c.budget)


def plain_within(candidates: Sequence[tuple[str, Callable[[], bytes]]],
                 measure: Callable[[bytes], Measured], reference: Measured, max_drop: float,
                 below: int, on_point: Callable[[CurvePoint], None] | None = None,
                 size_offset: int = 0) -> tuple[int | None, list[CurvePoint]]:
    """``(name, build)`` plain candidates: measures those whose packet is smaller than
    ``below`` bytes (the ``MAX_PLAIN`` largest of them), smallest first, up to the first
    within ``max_drop``. Returns its index in ``candidates`` (None: none passed)
    and the points measured."""
    sizes = [len(build()) + size_offset for _, build in candidates]
    order = sorted((i for i, n in enumerate(sizes) if n < below), key=sizes.__getitem__)
    curve = []
    for i in order[-MAX_PLAIN:]:
        name, build = candidates[i]
        data = build()  # built again: a runtime takes versions in the order it is given them
        point = compare(measure(data), reference, len(data), len(data) + size_offset,
                        f"plain {name}")
        curve.append(point)
        if on_point is not None:
            on_point(point)
        if point.drop <= max_drop:
            return i, curve
    return None, curve


def chosen_row(search: dict) -> dict:
    """The row of a search's ``points`` that it chose (``chosen``: its budget,
    ``chosen_method``: codec or plain)."""
    return next(p for p in search["points"]
                if (p["budget"], p["method"]) == (search["chosen"], search["chosen_method"]))


def plot(curve: Sequence[CurvePoint], max_drop: float, chosen: CurvePoint, path: str) -> None:
    """Bytes against drop, the target line and the chosen packet (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CodecError("--plot needs matplotlib (pip install matplotlib)") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    codec = sorted((c for c in curve if c.method == "codec"), key=lambda c: c.nbytes)
    plain = [c for c in curve if c.method != "codec"]
    ax.plot([c.nbytes for c in codec], [c.drop for c in codec], "o-", label="codec")
    if plain:
        ax.plot([c.nbytes for c in plain], [c.drop for c in plain], "s", color="tab:orange",
                label="plain baselines")
    ax.axhline(max_drop, color="grey", linestyle="--", label=f"target {max_drop:g} pt")
    ax.plot([chosen.nbytes], [chosen.drop], "r*", markersize=14,
            label=f"chosen: {chosen.nbytes} B ({chosen.method})")
    ax.set_xscale("log")
    ax.set_xlabel("packet bytes")
    ax.set_ylabel("drop against the uncompressed adapter (points)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
