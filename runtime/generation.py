"""Token generation on the board with the KV cache (numpy + onnxruntime, no torch).

:func:`generate` runs the prompt once (empty pasts), then one token per step, feeding each
step's ``present`` cache back as the next ``past``. It holds the runtime's lock for the whole
request, so an adapter switch or install waits for the request to finish and a generation
never mixes two adapters. Greedy decoding at ``temperature == 0``; otherwise softmax
sampling at that temperature over the ``top_k`` largest logits (``0``: all) from a numpy
PCG64 generator seeded with ``seed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from solar_edge.errors import GenerationError
from solar_edge.runtime.families.causal_lm import CausalLMFamily

if TYPE_CHECKING:
    from solar_edge.runtime.engine import EdgeRuntime

OnToken = Callable[[int, str], None]  # (token id, new text) as each token arrives


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: every token
    seed: int | None = None

    def check(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # new tokens (the EOS token included)
    text: str = ""
    first_token_ms: float = 0.0   # prompt in -> first new token out
    total_ms: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding (the cached steps)."""
        steps = len(self.ids) - 1
        decode_s = (self.total_ms - self.first_token_ms) / 1e3
        return steps / decode_s if steps > 0 and decode_s > 0 else 0.0


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one position's logits."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < z.size:
        cut = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


class _TextStream:
    """New text as tokens arrive (held back while a byte-level character is incomplete)."""

    def __init__(self, family: CausalLMFamily) -> None:
        self.family = family
        self.shown = ""

    def push(self, ids: Sequence[int]) -> str:
        text = self.family.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def _prompt_ids(family: CausalLMFamily, prompt: str | Sequence[int], vocab: int) -> list[int]:
    if isinstance(prompt, str):
        return family.encode(prompt)
    ids = [int(t) for t in prompt]
    if not ids or any(t < 0 or t >= vocab for t in ids):
        raise GenerationError(f"prompt token ids must be a non-empty list in [0, {vocab})")
    return ids


def generate(runtime: EdgeRuntime, prompt: str | Sequence[int], max_new_tokens: int,
             sampling: Sampling = Sampling(),  # noqa: B008 (frozen)
             on_token: OnToken | None = None, *, stop_at_eos: bool = True) -> Generation:
    """Continue ``prompt`` (a text or token ids) by up to ``max_new_tokens`` tokens with the
    adapter that serves; ``on_token`` is called as each token arrives."""
    family = runtime.family
    if not isinstance(family, CausalLMFamily):
        raise GenerationError(f"this bundle's model ({family.name}) does not generate text")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling.check()
    rng = np.random.Generator(np.random.PCG64(sampling.seed))
    vocab = runtime.hidden
    result = Generation(_prompt_ids(family, prompt, vocab))
    needed = len(result.prompt_ids) + max_new_tokens - 1
    if family.max_positions and needed > family.max_positions:
        raise GenerationError(f"{len(result.prompt_ids)} prompt + {max_new_tokens} new tokens "
                              f"exceed the model's {family.max_positions} positions")
    stream = _TextStream(family)
    t0 = time.perf_counter()
    with runtime.serving():
        cur, start, past = np.array([result.prompt_ids], np.int64), 0, None
        for _ in range(max_new_tokens):
            outputs = runtime.run_graph(family.step_feeds(cur, start, past))
            if len(outputs) != 1 + len(family.past):
                raise GenerationError("the graph does not return logits and the present cache")
            past = dict(zip(family.past, outputs[1:], strict=True))
            start += cur.shape[1]
            token = choose(outputs[0][0, -1], sampling, rng)
            result.ids.append(token)
            if len(result.ids) == 1:
                result.first_token_ms = (time.perf_counter() - t0) * 1e3
            piece = stream.push(result.ids)
            if on_token is not None:
                on_token(token, piece)
            if stop_at_eos and token == family.eos_token_id:
                break
            cur = np.array([[token]], np.int64)
    result.total_ms = (time.perf_counter() - t0) * 1e3
    result.text = family.decode(result.ids)
    return result
