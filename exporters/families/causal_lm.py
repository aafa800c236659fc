"""Family ``causal-lm``: a decoder language model (LLaMA, GPT-2, ...) with a KV cache.

The graph takes ``input_ids`` ``(batch, seq)``, ``attention_mask`` ``(batch, past + seq)``,
``position_ids`` ``(batch, seq)`` and per layer ``past_key_values.<i>.key``/``.value``
``(batch, kv_heads, past, head_dim)``; it returns ``logits`` ``(batch, seq, vocab)`` and
``present.<i>.key``/``.value`` ``(batch, kv_heads, past + seq, head_dim)``. The first step of a
generation feeds empty pasts (length 0). Every ``nn.Linear``/``Conv1D`` outside the
``lm_head`` is adaptable, so PEFT ``CAUSAL_LM`` module names (``model.layers.0.self_attn.q_proj``,
``transformer.h.0.attn.c_attn``) are the bundle's layer names. The board side is
:mod:`solar_edge.runtime.families.causal_lm`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from solar_edge.errors import ExportError

from ..targets import is_conv1d
from .base import LoadedModel
from .text_encoder import TOKENIZER_FILES, TextEncoderModel, load_pretrained, quiet_loading

NAME = "causal-lm"
EXAMPLE_PAST = 4  # traced with a non-empty cache so the cache axes stay symbolic
EXAMPLE_SEQ = 3
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
TASK_TYPES = ("CAUSAL_LM",)  # PEFT task types a bundle of this family serves


def is_causal_lm(path: Path) -> bool:
    """Whether a transformers directory's ``config.json`` names a causal-LM architecture."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or [] if isinstance(config, dict) else []
    return any(isinstance(a, str) and a.endswith(CAUSAL_SUFFIXES) for a in archs)


def cache_shape(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers decoder config."""
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size")
               if not isinstance(getattr(config, k, None), int)]
    if missing:  # state-space models (Mamba, RWKV) keep no key/value cache
        raise ExportError(f"model_type {getattr(config, 'model_type', None)!r} is not "
                          f"supported: the decoder family serves attention with a key/value "
                          f"cache, and this config has no {', '.join(missing)}")
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]


class DecoderWrapper(nn.Module):
    """Positional graph inputs -> ``(logits, *presents)``; the LM sits at ``model``."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True)
        present: Any = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        flat: list[torch.Tensor] = []
        for layer in present.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


class DecoderLoadedModel(LoadedModel):
    """A :class:`LoadedModel` whose graph has the cache inputs and outputs."""

    layers: int = 0

    @property
    def output_names(self) -> list[str]:
        return ["logits", *present_names(self.layers)]

    def wrapper(self) -> nn.Module:  # type: ignore[override]
        return DecoderWrapper(self.model, self.layers).eval()

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {
            "input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
        axes.update({n: {0: "batch", 2: "past"} for n in past_names(self.layers)})
        axes.update({n: {0: "batch", 2: "total"} for n in present_names(self.layers)})
        return axes


def example_inputs(config: Any) -> dict[str, torch.Tensor]:
    layers, kv_heads, head_dim = cache_shape(config)
    gen = torch.Generator().manual_seed(0)
    vocab = int(config.vocab_size)
    inputs = {
        "input_ids": torch.randint(0, vocab, (1, EXAMPLE_SEQ), generator=gen),
        "attention_mask": torch.ones(1, EXAMPLE_PAST + EXAMPLE_SEQ, dtype=torch.int64),
        "position_ids": torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + EXAMPLE_SEQ).unsqueeze(0),
    }
    for name in past_names(layers):
        inputs[name] = torch.randn(1, kv_heads, EXAMPLE_PAST, head_dim, generator=gen)
    return inputs


def load_for_export(path: Path, name: str | None = None) -> LoadedModel:
    """A causal LM of a Hugging Face directory (with its tokenizer), ready to trace."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ExportError(f"{path} has no config.json: not a transformers model directory")
    tokenizer_files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not (path / "tokenizer.json").is_file():
        raise ExportError(f"{path} has no tokenizer.json (the board tokenises with it)")
    try:
        with quiet_loading():
            config = AutoConfig.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load a causal LM from {path}: {exc}") from exc
    layers, kv_heads, head_dim = cache_shape(config)
    eos = getattr(config, "eos_token_id", None)
    identity = {
        "name": name or path.name,
        "kind": "transformers",
        "family": NAME,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_size": int(config.vocab_size),
        "max_positions": int(getattr(config, "max_position_embeddings", None)
                             or getattr(config, "n_positions", 0) or 0),
        "eos_token_id": eos if isinstance(eos, int) else None,
        "cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
        "task_types": list(TASK_TYPES),
        # GPT-2's Conv1D stores weights in x out: PEFT adapters of it set fan_in_fan_out
        "fan_in_fan_out": any(is_conv1d(m) for m in model.modules()),
    }
    loaded = DecoderLoadedModel(model, example_inputs(config), identity, "logits",
                                tokenizer_files, supports_tflite=False)
    loaded.layers = layers
    return loaded


def next_token_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The refit's "head" for a decoder: logits per position, padding set to zero (a uniform
    distribution in teacher and student alike, so it adds nothing to the KL)."""
    return logits * mask.unsqueeze(-1).to(logits.dtype)


class CausalLMModel(TextEncoderModel):
    """:class:`~.base.TorchModel` of a causal LM (calibration): texts -> token feeds padded to
    the length asked for; hidden states are the logits, and :attr:`output_head` makes the
    refit's objective the KL of next-token distributions at every real position."""

    kind = "a causal LM"
    padding = "max_length"
    width_field = "vocab_size"
    output = "logits"
    output_head = staticmethod(next_token_logits)

    def __init__(self, module: nn.Module, tokenizer: Any) -> None:
        super().__init__(module, tokenizer)
        if self.tokenizer.pad_token is None:  # decoders often have none: pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token


def open_model(path: Path) -> CausalLMModel:
    """Tokenizer and causal LM of ``path``, in eval mode (calibration and refits)."""
    from transformers import AutoModelForCausalLM

    tokenizer, module = load_pretrained(path, AutoModelForCausalLM, "a causal LM")
    return CausalLMModel(module, tokenizer)
