"""Family ``causal-lm`` on the board: prompts -> token feeds with an empty KV cache.

The graph (exported by :mod:`solar_edge.exporters.families.causal_lm`) takes ``input_ids``,
``attention_mask``, ``position_ids`` and the per-layer ``past_key_values.<i>.key/value``, and
returns ``logits`` and the ``present`` cache. :meth:`CausalLMFamily.feeds` makes the first
step of texts (right-padded, pasts of length 0); :mod:`solar_edge.runtime.generation` feeds
the presents back step by step. Tokenisation is the bundle's ``tokenizer.json`` with its own
post-processor (a LLaMA tokenizer's BOS is added as in transformers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from solar_edge.errors import BundleError, GenerationError, RuntimeApplyError

NAME = "causal-lm"
HEALTH_TEXT = "solar-edge health check: def main():"
INPUTS = ("input_ids", "attention_mask", "position_ids")


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]


class CausalLMFamily:
    """Texts in; "hidden states" are the logits ``(batch, seq, vocab)`` and the mask."""

    name = NAME

    def __init__(self, tokenizer_json: Path | None, identity: Mapping[str, Any],
                 input_names: Sequence[str]) -> None:
        if tokenizer_json is None or not Path(tokenizer_json).is_file():
            raise BundleError("a causal-lm bundle needs tokenizer/tokenizer.json")
        cache: Any = identity.get("cache")
        try:
            self.layers = int(cache["layers"])
            self.kv_heads = int(cache["kv_heads"])
            self.head_dim = int(cache["head_dim"])
        except (TypeError, KeyError, ValueError) as exc:
            raise BundleError("manifest model.cache must give layers, kv_heads and head_dim",
                              path="manifest.json") from exc
        self.past = past_names(self.layers)
        missing = [n for n in (*INPUTS, *self.past) if n not in input_names]
        if missing:
            raise BundleError(f"the graph lacks the decoder inputs {missing[:4]}",
                              path="manifest.json")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        eos = identity.get("eos_token_id")
        self.eos_token_id: int | None = eos if isinstance(eos, int) else None
        self.max_positions = int(identity.get("max_positions") or 0)  # 0: not known
        self.health_input: list[str] = [HEALTH_TEXT]

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text).ids)
        if not ids:
            raise GenerationError("the prompt encodes to no tokens")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {n: np.zeros(shape, np.float32) for n in self.past}

    def step_feeds(self, ids: np.ndarray, start: int, past: Mapping[str, np.ndarray] | None
                   ) -> dict[str, np.ndarray]:
        """Feeds for tokens ``ids`` ``(batch, seq)`` at positions ``start ..`` after ``past``."""
        batch, seq = ids.shape
        if self.max_positions and start + seq > self.max_positions:
            raise GenerationError(f"{start + seq} tokens exceed the model's "
                                    f"{self.max_positions} positions")
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, start + seq), np.int64),
                 "position_ids": np.arange(start, start + seq, dtype=np.int64)[None].repeat(
                     batch, axis=0)}
        feeds.update(self.empty_past(batch) if past is None else dict(past))
        return feeds

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """First step for texts, right-padded (padding masked), with empty pasts."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RuntimeApplyError("a causal LM takes a text or a list of texts")
        rows = [self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        feeds = self.step_feeds(ids, 0, None)
        feeds["attention_mask"] = mask
        return feeds

    def hidden(self, outputs: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """The logits and the attention mask of the fed positions."""
        return outputs[0], feeds["attention_mask"][:, -outputs[0].shape[1]:]
