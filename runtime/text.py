"""Tokenisation on the board with the Rust ``tokenizers`` package (no transformers, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from solar_edge.errors import BundleError

DEFAULT_MAX_LEN = 128


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


def find_tokenizer(bundle_dir: str | Path) -> Path | None:
    """``tokenizer/tokenizer.json`` (bundle layout) or ``tokenizer.json`` at the top."""
    for rel in ("tokenizer/tokenizer.json", "tokenizer.json"):
        path = Path(bundle_dir) / rel
        if path.is_file():
            return path
    return None
