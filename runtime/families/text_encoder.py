"""Family ``text-encoder`` on the board: texts -> token feeds; hidden states and mask out.

Tokenisation uses the Rust ``tokenizers`` package with the bundle's ``tokenizer.json`` (no
transformers, no torch). A text's hidden states are the graph's first output
(``last_hidden_state``); heads pool them (:mod:`solar_edge.runtime.heads`). The server side
is :mod:`solar_edge.exporters.families.text_encoder`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from solar_edge.errors import BundleError, RuntimeApplyError

NAME = "text-encoder"
DEFAULT_MAX_LEN = 128
# Short on purpose: every stage runs it through the staged adapter (4 tokens with [CLS]/[SEP]);
# any non-finite weight reaches every position's output, so a longer text finds nothing more.
HEALTH_TEXT = "health check"


class TextEncoder:
    """Encodes a batch of texts into the int64 feeds a BERT-style graph takes."""

    def __init__(
        self, tokenizer_json: str | Path, max_len: int = DEFAULT_MAX_LEN, *, fixed: bool = False
    ) -> None:
        """``fixed`` pads every text to ``max_len`` (static-shape graphs such as TFLite)."""
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # base dependency; a broken install is a clear error
            raise BundleError("the 'tokenizers' package is needed to encode text") from exc
        path = Path(tokenizer_json)
        if not path.is_file():
            raise BundleError("no tokenizer.json in the bundle", path=str(path))
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_len)
        if fixed:
            self.tokenizer.enable_padding(length=max_len)
        else:
            self.tokenizer.enable_padding()
        self.max_len = max_len

    def __call__(self, texts: Sequence[str], input_names: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("no texts to encode")
        enc = self.tokenizer.encode_batch(list(texts))
        arrays = {
            "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
        }
        return {name: arrays[name] for name in input_names if name in arrays}


class TextEncoderFamily:
    """Texts in; features are mean-pooled hidden states (see the module docstring)."""

    name = NAME

    def __init__(self, tokenizer_json: Path | None, input_names: Sequence[str],
                 fixed_seq_len: int | None) -> None:
        if tokenizer_json is None:
            raise BundleError("a text-encoder bundle needs tokenizer/tokenizer.json")
        self.encoder = TextEncoder(tokenizer_json, fixed_seq_len or DEFAULT_MAX_LEN,
                                   fixed=fixed_seq_len is not None)
        self.input_names = list(input_names)
        self.health_input: list[str] = [HEALTH_TEXT]

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RuntimeApplyError("a text encoder takes a text or a list of texts")
        return self.encoder(texts, self.input_names)

    def hidden(self, outputs: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """The last hidden states and the attention mask (heads pool them)."""
        return outputs[0], feeds["attention_mask"]
