"""Small ``module:function`` model builders: templates for exporting any torch model.

``solar-edge export solar_edge.exporters.examples:tiny_gpt2 --device x86-64 --out b``
exports a randomly initialised 2-layer GPT-2 (transformers ``Conv1D`` layers); ``tiny_vit``
does the same for a ViT (``nn.Linear`` layers, image input). They are not trained: they
show that the export stage does not depend on MiniLM. Seeds are fixed, so repeated
exports produce the same weights.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(1234)
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                        n_inner=96, bos_token_id=256, eos_token_id=256,  # within the vocabulary
                        attn_implementation="eager")  # type: ignore[call-arg]
    model = GPT2Model(config).eval()
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, config.vocab_size, (2, 11), generator=g)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def tiny_vit() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(4321)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=48,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       attn_implementation="eager")  # type: ignore[call-arg]
    model = ViTModel(config).eval()
    g = torch.Generator().manual_seed(6)
    return model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
