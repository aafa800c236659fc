"""Train PEFT ``CAUSAL_LM`` LoRA adapters on the project's decoder, on two domains (cached).

    python scripts/train_lm_adapters.py [--base artifacts/lm/base] [--minutes 1.5]

Domains (``scripts/lm_data.py``): ``docs`` (pydoc topics the pretraining never saw) and
``email`` (the ``email`` package's source, left out of pretraining). Two configurations each:
``qv-r8`` (r=8 on q/v) and ``all-r16`` (r=16 on q, k, v, o, gate, up, down). Each adapter
trains for a wall-clock budget; ``<out>/metrics.json`` gives the held-out perplexity of the
base model and of each adapter on its domain. Adapters go to ``<out>/<domain>-<config>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lm_data
import numpy as np
import torch
from pretrain_lm import EVAL_WINDOWS, SEQ, lm_perplexity, token_stream, windows

CONFIGS = {
    "qv-r8": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "all-r16": {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"]},
}


def train_one(base_dir: Path, train: np.ndarray, held: np.ndarray, config: dict,
              minutes: float, seed: int, out: Path) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    lora = LoraConfig(task_type="CAUSAL_LM", r=config["r"], lora_alpha=2 * config["r"],
                      lora_dropout=0.0, target_modules=config["target_modules"])
    peft_model = get_peft_model(model, lora).train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < minutes * 60:
        idx = rng.integers(0, len(train) - SEQ - 1, 8)
        x = torch.from_numpy(np.stack([train[i:i + SEQ] for i in idx]))
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    ppl = lm_perplexity(peft_model, held)
    peft_model.save_pretrained(str(out))
    return {"heldout_ppl": ppl, "steps": step, "train_tokens": int(len(train)),
            "trainable": int(sum(p.numel() for p in params))}


def main() -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("artifacts/lm/base"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/lm/adapters"))
    ap.add_argument("--minutes", type=float, default=1.5, help="training budget per adapter")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    base_model = AutoModelForCausalLM.from_pretrained(str(args.base)).eval()
    metrics_path = args.out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    for d_i, domain in enumerate(lm_data.DOMAINS):
        train = token_stream(tok, lm_data.texts(f"{domain}-train"))
        held = windows(token_stream(tok, lm_data.texts(f"{domain}-heldout")), EVAL_WINDOWS)
        row = metrics.setdefault(domain, {})
        row["base_heldout_ppl"] = lm_perplexity(base_model, held)
        for c_i, (name, config) in enumerate(CONFIGS.items()):
            out = args.out / f"{domain}-{name}"
            if (out / "adapter_config.json").is_file() and not args.force and name in row:
                continue
            row[name] = train_one(args.base, train, held, config, args.minutes,
                                  10 * d_i + c_i, out)
            print(domain, name, row[name], "base", row["base_heldout_ppl"], flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
