"""Pretrain the project's own small LLaMA-architecture decoder on offline text (cached).

    python scripts/pretrain_lm.py [--out artifacts/lm] [--minutes 20] [--threads 1]

A byte-level BPE tokenizer (``tokenizers``) and a ``LlamaConfig`` causal LM (RMSNorm, RoPE,
SwiGLU, grouped-query attention, a few million parameters) are trained here on the Python
standard library's source and pydoc topics (``scripts/lm_data.py``) for a wall-clock budget.
Written to ``<out>/base`` as a Hugging Face directory (config, safetensors, tokenizer) and
``<out>/metrics.json``: held-out perplexity next to a unigram and a bigram model of the same
tokens. It is generated, never committed; a second run reuses it unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import lm_data
import numpy as np
import torch

SPECIALS = ["<pad>", "<s>", "</s>"]
SEQ = 128
EVAL_WINDOWS = 150


def train_tokenizer(docs: list[str], vocab: int, out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out))
    return tok


def token_stream(tok: object, docs: list[str]) -> np.ndarray:
    """Documents encoded and joined, each followed by ``</s>`` (id 2)."""
    ids: list[int] = []
    for enc in tok.encode_batch(docs):  # type: ignore[attr-defined]
        ids.extend(enc.ids)
        ids.append(2)
    return np.asarray(ids, np.int64)


def windows(stream: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` consecutive non-overlapping windows of ``SEQ`` tokens."""
    n = min(count, len(stream) // SEQ)
    return stream[: n * SEQ].reshape(n, SEQ)


def lm_perplexity(model: torch.nn.Module, wins: np.ndarray) -> float:
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), 16):
            x = torch.from_numpy(wins[i:i + 16])
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += x[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def ngram_perplexities(train: np.ndarray, wins: np.ndarray, vocab: int) -> dict[str, float]:
    """Add-one unigram, and a bigram interpolated with it (best weight on this held-out
    text, which favours the baseline)."""
    uni = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    uni /= uni.sum()
    pairs = train[:-1] * vocab + train[1:]
    keys, counts = np.unique(pairs, return_counts=True)
    prev_total = np.bincount(train[:-1], minlength=vocab).astype(np.float64)
    prev, nxt = wins[:, :-1].reshape(-1), wins[:, 1:].reshape(-1)
    q = prev * vocab + nxt
    pos = np.searchsorted(keys, q)
    hit = (pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == q)
    pair_count = np.where(hit, counts[np.minimum(pos, len(keys) - 1)], 0).astype(np.float64)
    cond = np.divide(pair_count, prev_total[prev], out=np.zeros_like(pair_count),
                     where=prev_total[prev] > 0)
    out = {"unigram": math.exp(-np.log(uni[nxt]).mean())}
    out["bigram"] = min(math.exp(-np.log(lam * cond + (1 - lam) * uni[nxt]).mean())
                        for lam in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95))
    return out


def build_model(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.02)
    return LlamaForCausalLM(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts/lm"))
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    base = args.out / "base"
    if (base / "config.json").is_file() and not args.force:
        print(f"cached: {base} (use --force to retrain)")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    work = args.out / "base.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    docs = lm_data.texts("pretrain")
    tok = train_tokenizer(docs, args.vocab, work)
    vocab = tok.get_vocab_size()  # type: ignore[attr-defined]
    train = token_stream(tok, docs)
    held = windows(token_stream(tok, lm_data.texts("pretrain-heldout")), EVAL_WINDOWS)
    print(f"tokenizer {vocab} tokens; {len(train)} training tokens; "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    model = build_model(vocab).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    budget, batch, warmup = args.minutes * 60.0, 16, 50
    start, step, seen = time.perf_counter(), 0, 0
    while (elapsed := time.perf_counter() - start) < budget:
        frac = elapsed / budget
        lr = 2e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(train) - SEQ - 1, batch)
        x = torch.from_numpy(np.stack([train[i:i + SEQ] for i in idx]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, seen = step + 1, seen + x.numel()
        if step % 100 == 0:
            print(f"step {step} loss {float(loss):.3f} lr {lr:.2e} "
                  f"{elapsed / 60:.1f} min", flush=True)
    train_s = time.perf_counter() - start
    metrics = {"parameters": params, "vocab": vocab, "steps": step, "tokens_seen": seen,
               "train_minutes": round(train_s / 60, 2), "threads": args.threads,
               "heldout": {"model": lm_perplexity(model, held),
                           **ngram_perplexities(train, held, vocab)},
               "domains": {}}
    for domain in lm_data.DOMAINS:
        wins = windows(token_stream(tok, lm_data.texts(f"{domain}-heldout")), EVAL_WINDOWS)
        metrics["domains"][domain] = {"model": lm_perplexity(model, wins),
                                      **ngram_perplexities(train, wins, vocab)}
    model.eval().save_pretrained(str(work))
    shutil.rmtree(base, ignore_errors=True)
    work.rename(base)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
