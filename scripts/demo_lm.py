"""Decoder demo (``make demo-lm``): one prompt answered by two adapters on the board.

Pretrains the project's decoder and its adapters if they are not cached (``artifacts/lm``,
about 20 + 6 minutes on 2 cores the first time; ``LM_MINUTES`` shortens the pretraining),
exports the bundle, compresses the ``docs`` and ``email`` adapters into signed packets with
the data-free codec, and runs ``solar-edge generate`` with both staged in one session,
switching between them for the same prompt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "artifacts" / "lm"
OUT = ROOT / "out" / "lm-demo"
CLI = [sys.executable, "-m", "solar_edge.cli"]
PROMPT = "Exceptions are"


def step(title: str, args: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(str(a) for a in args)}", flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def main() -> None:
    nice = ["nice", "-n", "10"]
    minutes = os.environ.get("LM_MINUTES", "20")
    step("pretrain (cached)", [*nice, sys.executable, "scripts/pretrain_lm.py",
                               "--minutes", minutes])
    step("adapters (cached)", [*nice, sys.executable, "scripts/train_lm_adapters.py"])
    bundle = LM / "bundle"
    if not (bundle / "manifest.json").is_file():
        step("export", [*CLI, "export", str(LM / "base"), "--device", "x86-64", "--out",
                        str(bundle)])
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "signing.key").is_file():
        step("keys", [*CLI, "keygen", "--out", str(OUT)])
    packets = []
    for name in ("docs", "email"):
        packet = OUT / f"{name}.slr"
        step(f"compress {name}", [*CLI, "compress", str(LM / "adapters" / f"{name}-all-r16"),
                                  "--bundle", str(bundle), "--budget", "96000",
                                  "--signing-key", str(OUT / "signing.key"), "--out",
                                  str(packet), "--adapter-id", name, "--quiet"])
        packets += ["--packet", str(packet)]
    step("the same prompt, two adapters, one session",
         [*CLI, "generate", "--bundle", str(bundle), *packets, "--trusted-key",
          str(OUT / "signing.pub"), "--prompt", PROMPT, "--max-new-tokens", "48",
          "--switch", "docs", "--switch", "email"])


if __name__ == "__main__":
    main()
