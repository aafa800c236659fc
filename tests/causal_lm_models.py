"""Tiny random-initialised decoders (LLaMA, GPT-2) with a byte-level BPE trained here, and
random PEFT ``CAUSAL_LM`` LoRA adapters on them: test material for the causal-lm family."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The board receives a small signed packet and applies it to the model.",
    "for item in items:\n    print(item)\n",
    "Adapters switch between requests without rebuilding the session.",
] * 8
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}
# other architectures, tiny: Qwen2 (LLaMA-like, biased q/k/v) is served; Mamba keeps no KV
# cache and Bloom's ALiBi takes no position ids, so both are refused at export
OTHER_CONFIGS = {
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                  initializer_range=0.2),
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=4),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
}
TARGETS["qwen2"] = TARGETS["llama"]
PROMPTS = ["def add(a, b):", "The board receives", "for item in"]


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out))


def make_model(kind: str, out: Path, seed: int = 0) -> Path:
    """A saved tiny decoder of ``kind`` (``llama``, ``gpt2`` or one of ``OTHER_CONFIGS``)
    with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=96, initializer_range=0.2,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model: torch.nn.Module = LlamaForCausalLM(config)
    elif kind in OTHER_CONFIGS:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(kind, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, **OTHER_CONFIGS[kind])
        model = AutoModelForCausalLM.from_config(config)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=96,
                            initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
        model = GPT2LMHeadModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(str(out))
    write_tokenizer(out)
    return out


def make_adapter(kind: str, model_dir: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """A random (untrained, non-zero) ``CAUSAL_LM`` LoRA adapter on every adaptable linear."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                        target_modules=TARGETS[kind], init_lora_weights=False,
                        fan_in_fan_out=kind == "gpt2")
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out))
    return out


def torch_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int],
                 new_tokens: int) -> list[int]:
    """Greedy tokens of ``PeftModel.merge_and_unload()`` + ``generate`` (or the base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt_ids):]]


def lossless_packet(adapter_dir: Path, bundle, key, adapter_id: str, version: int = 1) -> bytes:
    """The adapter as a float32 (uncompressed) packet, as ``compress`` signs packets."""
    from solar_edge.exporters.compress import prepare_adapter, sign_packet
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.methods.peft_files import read_adapter

    prep = prepare_adapter(read_adapter(adapter_dir), bundle)
    return sign_packet(prep, lossless_records(prep), key, adapter_id, version)[0]
