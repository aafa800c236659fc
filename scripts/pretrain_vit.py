"""Pretrain a small ViT on scikit-learn's digits 0-4, then train PEFT LoRA adapters (with a
trained classifier in ``modules_to_save``) and head-only baselines for two other tasks.

    nice -n 10 python scripts/pretrain_vit.py [--out artifacts/vit] [--epochs 60]

Writes (never committed; ``make clean`` removes artifacts/):

* ``OUT/base``: the pretrained ``ViTForImageClassification`` (16x16 gray, patch 4, hidden
  64, 4 layers) with ``preprocessor_config.json``;
* ``OUT/<task>/adapter``: ``PeftModel.save_pretrained`` (LoRA r=8 on q_proj/v_proj +
  classifier) and the model's ``config.json`` (``id2label``);
* ``OUT/<task>/head-only.json`` and ``OUT/<task>/metrics.json``: held-out accuracies;
* ``OUT/<task>/calib``: 64 unlabelled training images as PNG (for ``compress --calib-data``).

Tasks and data: :mod:`solar_edge.exporters.vit_digits`. One torch thread, a few minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from solar_edge.exporters.vit_digits import SIZE, TASKS, ImageSplit, pretrain_task, task
from solar_edge.runtime.images import ImageSpec, pixel_values

SPEC = ImageSpec(SIZE, SIZE, 1, (0.5,), (0.5,), 1 / 255)


def pixels(split: ImageSplit) -> torch.Tensor:
    return torch.from_numpy(pixel_values(list(split.images), SPEC))


def train(model: torch.nn.Module, split: ImageSplit, epochs: int, lr: float,
          seed: int = 0) -> float:
    x, y = pixels(split), torch.from_numpy(split.labels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: ImageSplit) -> float:
    logits = model(pixel_values=pixels(split)).logits
    return float((logits.argmax(1).numpy() == split.labels).mean())


def classifier_model(base: Path, labels: list[str]) -> torch.nn.Module:
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)


def pretrain(out: Path, epochs: int) -> dict:
    from transformers import ViTConfig, ViTForImageClassification

    data = pretrain_task()
    config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=1, hidden_size=64,
                       num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       num_labels=len(data.labels), id2label=dict(enumerate(data.labels)),
                       label2id={n: i for i, n in enumerate(data.labels)})
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    t = time.perf_counter()
    train(model, data.train, epochs, 1e-3)
    result = {"task": data.name, "train": len(data.train.labels),
              "held_out": len(data.test.labels), "accuracy": accuracy(model, data.test),
              "seconds": round(time.perf_counter() - t, 1)}
    model.save_pretrained(out / "base")
    (out / "base" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5],
         "image_std": [0.5]}, indent=1))
    return result


def adapt(out: Path, name: str, epochs: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    data = task(name)
    folder = out / name
    (folder / "calib").mkdir(parents=True, exist_ok=True)
    for i in range(64):
        Image.fromarray(data.train.images[i]).save(folder / "calib" / f"{i:03d}.png")
    torch.manual_seed(1)
    head_only = classifier_model(out / "base", data.labels)
    for pname, p in head_only.named_parameters():
        p.requires_grad_(pname.startswith("classifier."))
    train(head_only, data.train, epochs, 1e-2)
    head_acc = accuracy(head_only, data.test)
    torch.manual_seed(1)
    model = get_peft_model(classifier_model(out / "base", data.labels),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                      lora_dropout=0.0, modules_to_save=["classifier"]))
    t = time.perf_counter()
    train(model, data.train, epochs, 3e-3)
    result = {"task": name, "labels": data.labels, "train": len(data.train.labels),
              "held_out": len(data.test.labels), "head_only_accuracy": head_acc,
              "adapter_accuracy": accuracy(model, data.test),
              "seconds": round(time.perf_counter() - t, 1)}
    model.save_pretrained(folder / "adapter")
    model.base_model.model.config.save_pretrained(folder / "adapter")
    (folder / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/vit"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--adapter-epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(pretrain(args.out, args.epochs)), flush=True)
    for name in TASKS:
        print(json.dumps(adapt(args.out, name, args.adapter_epochs)), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
