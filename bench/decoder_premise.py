"""SOLAR's premise measured on the project's decoder (artifacts of scripts/pretrain_lm.py and
scripts/train_lm_adapters.py).

    python bench/decoder_premise.py [--lm artifacts/lm] [--out FILE.json]

For every trained adapter and layer: the share of ``|dW|_F^2`` inside ``W0``'s top-``r``
singular subspaces on both sides (``|U_r^T dW V_r|^2 / |dW|^2``, ``r`` = a third of the
smaller dimension, the MiniLM measurement's ratio), against the same share for random
orthonormal subspaces of the same size (mean of 4 draws; its expectation is
``r^2 / (out * in)``), averaged per layer type. Then which record kinds the data-free
allocator picks at several budgets: ``DENSE_FACTORS`` (plain factors) or a W0-basis kind
(``SPARSE_CORE``, ``FACTORED_CORE``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

BUDGETS = (2000, 4000, 8000, 16000)


def shares(w0: np.ndarray, dw: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    out, inp = w0.shape
    r = max(1, min(out, inp) // 3)
    u, _, vt = np.linalg.svd(w0.astype(np.float64), full_matrices=False)
    total = float((dw ** 2).sum())
    top = float(((u[:, :r].T @ dw @ vt[:r].T) ** 2).sum()) / total
    rand = []
    for _ in range(4):
        qu = np.linalg.qr(rng.standard_normal((out, r)))[0]
        qv = np.linalg.qr(rng.standard_normal((inp, r)))[0]
        rand.append(float(((qu.T @ dw @ qv) ** 2).sum()) / total)
    return top, float(np.mean(rand))


def main() -> None:
    from solar_edge.exporters.compress import CompressOptions, compress_adapter
    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle
    from solar_edge.format.reader import decode_packet
    from solar_edge.methods.matching import match_to_bundle
    from solar_edge.methods.peft_files import read_adapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", type=Path, default=Path("artifacts/lm"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bundle = load_bundle(args.lm / "bundle")
    key = signing.generate_private_key()
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {}
    for adapter_dir in sorted((args.lm / "adapters").iterdir()):
        if not (adapter_dir / "adapter_config.json").is_file():
            continue
        adapter = read_adapter(adapter_dir)
        updates = match_to_bundle(adapter.updates, bundle.layers)
        by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for lid, u in updates.items():
            w0 = np.asarray(bundle.base_weight(lid), np.float64)
            dw = np.asarray(u.B, np.float64) @ np.asarray(u.A, np.float64)
            by_type[bundle.layer(lid).name.rsplit(".", 1)[-1]].append(shares(w0, dw, rng))
        row: dict[str, Any] = {"share_top_vs_random": {
            t: [round(float(np.mean([a for a, _ in v])), 4),
                round(float(np.mean([b for _, b in v])), 4)] for t, v in sorted(by_type.items())}}
        kinds: dict[str, dict[str, int]] = {}
        for budget in BUDGETS:
            try:
                packet = compress_adapter(adapter_dir, bundle, key, CompressOptions(
                    budget=budget, canary="none"))
            except Exception as exc:  # noqa: BLE001 - a budget too small is reported
                kinds[str(budget)] = {"error": str(exc)[:80]}  # type: ignore[dict-item]
                continue
            records = decode_packet(packet.data, [key.public_key()]).records
            kinds[str(budget)] = dict(Counter(r.kind.name for r in records))
        row["record_kinds_by_budget"] = kinds
        result[adapter_dir.name] = row
        print(adapter_dir.name, json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
