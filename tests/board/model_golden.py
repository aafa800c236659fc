"""Model outputs for fixed inputs, golden from x86-64: the tiny GPT-2 bundle, served plain and
patched with a factored-core packet (every layer, some perturbed).

The bundle is not committed (600 KB); its export is deterministic, so the board check
exports it on the host (``tests/board/model_golden.py --bundle DIR`` writes the golden
outputs from such a bundle) and the golden file records its fingerprint. Outputs are
compared within :data:`OUTPUT_RTOL` of the largest golden magnitude (docs/packet-format.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from golden_cases import GOLDEN_DIR, PACKET_DIR, int_matrix

from solar_edge.format import signing
from solar_edge.format.bundle import load_bundle
from solar_edge.format.packet import PacketHeader
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet
from solar_edge.regen import update_digest
from solar_edge.runtime.engine import EdgeRuntime

MODEL = GOLDEN_DIR / "board_model.npz"
OUTPUT_RTOL = 1e-4
KEY = PACKET_DIR / "TEST-ONLY-golden-signing.key"


def feeds() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(4).integers(0, 256, size=(2, 7), dtype=np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def model_packet(bundle_dir: str | Path) -> bytes:
    """A factored core of rank 2 on every layer (8 x 8 coordinates), signed with the
    TEST-ONLY golden key: the same bytes on every platform."""
    bundle = load_bundle(bundle_dir)
    records = []
    for layer in bundle.layers:
        r = min(8, layer.rank)
        vals = (int_matrix(layer.id, 1, 4 * r)[0] * np.float32(0.5)).astype(np.float32)
        records.append(LayerRecord(layer.id, RecordKind.FACTORED_CORE, r, r, 2,
                                   QuantizedValues(ValueFormat.FLOAT32, vals.size, raw=vals),
                                   variant=layer.id % 3, epsilon=0.1 * (layer.id % 2)))
    codec = CodecHeader(seed=0xB0A4D, perturbation=PerturbationKind.UNIFORM)
    header = PacketHeader(bundle.fingerprint, "board-golden", 1, {})
    return encode_packet(header, codec, records, signing.load_private_key(KEY), compress=False)


def outputs(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    """The bundle's first output for :func:`feeds`, plain and with :func:`model_packet`, and
    the packet's update digest as this platform decodes it (a packet made on x86-64 vouches
    with the x86-64 digest, which a board must reproduce within its tolerance)."""
    key = signing.load_private_key(KEY)
    rt = EdgeRuntime(str(bundle_dir), [key.public_key()], mechanism="initializer")
    plain = rt.infer(feeds())
    info = rt.apply(model_packet(bundle_dir))
    return {"plain": plain, "patched": rt.infer(feeds()),
            "update_digest": np.asarray(rt.update_digest(info.adapter_id), np.float64)}


def fingerprint(bundle_dir: str | Path) -> str:
    return load_bundle(bundle_dir).fingerprint.hex()


def write_golden(bundle_dir: str | Path) -> None:
    np.savez_compressed(MODEL, fingerprint=np.array(fingerprint(bundle_dir)),
                        **outputs(bundle_dir))


def compare(bundle_dir: str | Path) -> list[tuple[str, str, str]]:
    """``(item, status, detail)`` per output; ``stale`` when the bundle is not the golden's."""
    with np.load(MODEL) as ref:
        if str(ref["fingerprint"]) != fingerprint(bundle_dir):
            return [("model outputs", "stale", "bundle fingerprint is not the golden's")]
        want = {k: ref[k] for k in ("plain", "patched", "update_digest")}
    got = outputs(bundle_dir)
    rows = []
    for name, w in want.items():
        g = got[name]
        if g.shape == w.shape and np.array_equal(g, w):
            rows.append((f"model {name}", "identical", ""))
            continue
        if name == "update_digest":  # the board's own check, at the tolerance compress signs
            problem = update_digest.mismatch(g.tolist(), w.tolist(),
                                             update_digest.DEFAULT_TOLERANCE)
            rows.append(("update digest", "DIFFERS" if problem else "within tolerance",
                         problem or f"max abs {float(np.abs(g - w).max()):.2g}"))
            continue
        rel = float(np.abs(g - w).max() / np.abs(w).max()) if g.shape == w.shape else np.inf
        rows.append((f"model {name}", "within tolerance" if rel <= OUTPUT_RTOL else "DIFFERS",
                     f"max rel {rel:.2g} (tolerance {OUTPUT_RTOL:g})"))
    return rows


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--write"]:
        write_golden(args[1])
        print(f"wrote {MODEL}")
    else:
        result = compare(args[0])
        for row in result:
            print(f"{row[0]:<12} {row[1]} {row[2]}".rstrip())
        sys.exit(0 if all(s in ("identical", "within tolerance") for _, s, _ in result) else 1)
