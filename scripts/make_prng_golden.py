"""Write solar_edge/golden/prng_vectors.json: pinned outputs of the perturbation PRNG.

The file freezes the stream definition (keying, element order, word -> float mapping) so
that any change to it fails tests/test_prng.py. Regenerate only on a deliberate,
versioned change of the packet format:

    python scripts/make_prng_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from solar_edge.format.records import PerturbationKind
from solar_edge.regen.prng import perturbation_columns, random_words

GOLDEN = Path(__file__).resolve().parents[1] / "solar_edge" / "golden" / "prng_vectors.json"

# (seed, layer_id, stream, start, count): small and large seeds, start offsets that are
# not block-aligned, a block counter above 2**32, the largest layer id and stream.
WORD_CASES = [
    (0, 0, 0, 0, 8),
    (1, 0, 0, 0, 8),
    (12345, 3, 1, 5, 7),
    (2**32 - 1, 7, 2, 1, 6),
    (2**32, 7, 3, 0, 4),
    (0xDEADBEEFCAFEF00D, 11, 4, 1_000_003, 9),
    (2**64 - 1, 0xFFFFFFFF, 0xFFFFFFFF, 2**34 + 2, 6),
]

# (seed, layer_id, stream, n_rows, columns, kind)
PERTURBATION_CASES = [
    (0, 0, 0, 5, [0, 1, 2], PerturbationKind.RADEMACHER),
    (42, 3, 1, 7, [4, 0, 9], PerturbationKind.RADEMACHER),
    (2**63 + 17, 5, 2, 6, [1, 383], PerturbationKind.RADEMACHER),
    (42, 3, 1, 7, [4, 0, 9], PerturbationKind.UNIFORM),
    (0xDEADBEEFCAFEF00D, 11, 5, 9, [0, 2, 2, 100], PerturbationKind.UNIFORM),
]


def f32_hex(values: np.ndarray) -> list[str]:
    """Bit patterns of float32 values as 8-digit hex strings (exact, platform-independent)."""
    return [f"{int(b):08x}" for b in np.asarray(values, np.float32).view(np.uint32).ravel()]


def build() -> dict:
    words = [
        {"seed": s, "layer_id": lid, "stream": st, "start": start, "count": n,
         "words": [f"{int(w):08x}" for w in random_words(s, lid, st, start, n)]}
        for s, lid, st, start, n in WORD_CASES
    ]
    perturbations = [
        {"seed": s, "layer_id": lid, "stream": st, "n_rows": n, "columns": cols,
         "kind": kind.name,
         # row-major (n_rows, len(columns)) float32 bit patterns
         "values_f32": f32_hex(perturbation_columns(s, lid, st, n, np.array(cols), kind))}
        for s, lid, st, n, cols, kind in PERTURBATION_CASES
    ]
    return {
        "generator": "philox4x32-10",
        "keying": "key=(seed lo32, seed hi32); ctr=(block lo32, block hi32, layer_id, stream)",
        "words": words,
        "perturbations": perturbations,
    }


def main() -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
