"""Cross-platform golden cases: what a board computes, compared with what x86-64 wrote.

``python tests/board/golden_cases.py --write`` runs :func:`compute` on x86-64 and writes
``tests/golden/board_golden.json`` (SHA-256 of every exact item) and
``tests/golden/board_factors.npz`` (the float32 factors of the kinds that are only equal
within a tolerance). :func:`compare` recomputes everything on the machine it runs on and
says, per item, ``identical``, ``within tolerance`` or ``DIFFERS``; ``python
tests/board/golden_cases.py`` prints that table (the board check runs it under qemu).

Inputs are built from integers only (exact float32 values), so the bases themselves are
the same bits everywhere and any difference comes from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from solar_edge.decode import decode_factors, factor_bound
from solar_edge.format import signing
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    PrngKind,
    QuantizedValues,
    RecordKind,
    ValueFormat,
)
from solar_edge.methods.vera import VeraProjections
from solar_edge.regen.bases import perturbed_columns, u_stream
from solar_edge.regen.heads import task_head
from solar_edge.regen.prng import perturbation_columns, random_words

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO / "tests" / "golden"
HASHES = GOLDEN_DIR / "board_golden.json"
FACTORS = GOLDEN_DIR / "board_factors.npz"
PACKET_DIR = Path(str(resources.files("solar_edge") / "golden"))  # installed package data

# (seed, layer_id, stream, start, count); starts cross the 32-bit low block counter.
WORD_CASES = [(0, 0, 0, 0, 4096), (7, 3, 1, 4 * (2**32 - 3), 64),
              (2**64 - 1, 2**32 - 1, 9, 5, 1000), (0xDEADBEEF, 35, 70, 4 * 2**32 - 2, 11)]
KINDS = (PerturbationKind.RADEMACHER, PerturbationKind.UNIFORM)
EPSILONS = (0.0, 0.03125, 0.1, 0.5)


def int_matrix(seed: int, rows: int, cols: int) -> np.ndarray:
    """A float32 matrix of exact values (integers / 1024) from a seeded integer stream."""
    ints = np.random.default_rng(seed).integers(-1024, 1025, size=(rows, cols), dtype=np.int64)
    return (ints.astype(np.float32) / np.float32(1024)).astype(np.float32)


def sha(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    digest = hashlib.sha256(a.dtype.str.encode() + str(a.shape).encode() + a.tobytes())
    return digest.hexdigest()[:24]


def _f16(seed: int, n: int) -> QuantizedValues:
    raw = (int_matrix(seed, 1, n)[0] * np.float32(4)).astype(np.float16)
    return QuantizedValues(ValueFormat.FLOAT16, n, raw=raw)


def synthetic_records() -> list[tuple[LayerRecord, LayerBasis]]:
    """Factored and sparse cores big enough that BLAS kernels pick different code paths."""
    out: list[tuple[LayerRecord, LayerBasis]] = []
    for lid, (o, i, r, rows, cols, k, eps) in enumerate(
            [(160, 96, 48, 40, 32, 4, 0.0), (160, 96, 48, 40, 32, 4, 0.1)], start=20):
        basis = LayerBasis(lid, int_matrix(lid, o, r), int_matrix(lid + 100, i, r))
        rec = LayerRecord(layer_id=lid, kind=RecordKind.FACTORED_CORE, rows=rows, cols=cols,
                          rank=k, values=_f16(lid, (rows + cols) * k), variant=2, epsilon=eps)
        out.append((rec, basis))
    basis = LayerBasis(30, int_matrix(30, 96, 40), int_matrix(130, 64, 40))
    pos = np.unique(np.random.default_rng(30).integers(0, 40 * 40, size=60)).astype(np.uint32)
    rec = LayerRecord(layer_id=30, kind=RecordKind.SPARSE_CORE, rows=40, cols=40, rank=0,
                      positions=pos, values=_f16(31, pos.size), variant=1, epsilon=0.1)
    out.append((rec, basis))
    return out


def golden_packet_records() -> tuple[CodecHeader, list[tuple[LayerRecord, LayerBasis]]]:
    """The committed golden packet, verified, with integer bases for its layers."""
    pub = signing.load_public_key(PACKET_DIR / "TEST-ONLY-golden-signing.pub")
    packet = decode_packet((PACKET_DIR / "golden.slr").read_bytes(), [pub])
    pairs = []
    for rec in packet.records:
        o, i = (rec.rows, rec.cols) if rec.kind == RecordKind.DENSE_FACTORS else (24, 20)
        pairs.append((rec, LayerBasis(rec.layer_id, int_matrix(rec.layer_id, o, 16),
                                      int_matrix(rec.layer_id + 100, i, 16))))
    return packet.codec, pairs


@dataclass
class Computed:
    exact: dict[str, np.ndarray]               # items that must be the same bits everywhere
    close: dict[str, tuple[np.ndarray, np.ndarray]]  # factors and their error bounds


def _decode(name: str, rec: LayerRecord, basis: LayerBasis, codec: CodecHeader,
            c: Computed) -> None:
    factors = decode_factors(rec, basis, codec)
    if rec.kind in (RecordKind.FACTORED_CORE, RecordKind.SPARSE_CORE):
        bounds = factor_bound(rec, basis, codec)
        for side, f, bound in zip("LR", factors, bounds, strict=True):
            c.close[f"{name}.{side}"] = (f, bound)
    else:
        for side, f in zip("LR", factors, strict=True):
            c.exact[f"{name}.{side}"] = f


def compute() -> Computed:
    c = Computed({}, {})
    for seed, lid, stream, start, count in WORD_CASES:
        c.exact[f"words {seed:#x}/{lid}/{stream}@{start}+{count}"] = random_words(
            seed, lid, stream, start, count)
    basis = int_matrix(5, 384, 64)
    for lid in range(36):
        for kind in KINDS:
            c.exact[f"perturbation l{lid} {kind.name}"] = perturbation_columns(
                1234 + lid, lid, 2 * lid, 384, np.arange(0, 64, 7), kind)
            for eps in EPSILONS[1:] if lid % 6 else EPSILONS:
                c.exact[f"columns l{lid} {kind.name} eps={eps}"] = perturbed_columns(
                    basis, lid, u_stream(lid % 3), np.arange(lid % 5, 64, 3), 99 + lid, eps,
                    kind)
    for seed, labels, hidden in [(0, 2, 384), (11, 3, 768), (2**31 + 5, 10, 64)]:
        c.exact[f"head seed={seed} {labels}x{hidden}"] = task_head(seed, labels, hidden)
    for key, rank, mo, mi in [(0, 4, 384, 384), (7, 8, 1536, 384), (0xFFFF, 2, 64, 96)]:
        proj = VeraProjections.generate(key, rank, mo, mi)
        c.exact[f"vera key={key} A"], c.exact[f"vera key={key} B"] = proj.A, proj.B
    codec, pairs = golden_packet_records()
    for rec, basis_ in pairs:
        _decode(f"golden.slr l{rec.layer_id} {rec.kind.name}", rec, basis_, codec, c)
    codec2 = CodecHeader(seed=0x5EED, prng=PrngKind.PHILOX4X32_10,
                         perturbation=PerturbationKind.RADEMACHER)
    for rec, basis_ in synthetic_records():
        _decode(f"synthetic l{rec.layer_id} {rec.kind.name} eps={rec.epsilon}", rec, basis_,
                codec2, c)
    return c


def write_golden() -> None:
    c = compute()
    hashes = {"exact": {k: sha(v) for k, v in c.exact.items()},
              "close": {k: sha(v) for k, (v, _) in c.close.items()}}
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    HASHES.write_text(json.dumps(hashes, indent=0) + "\n")
    np.savez_compressed(FACTORS, **{k: v for k, (v, _) in c.close.items()})


def within_bound(got: np.ndarray, ref: np.ndarray, bound: np.ndarray) -> tuple[bool, str]:
    """Whether ``got`` is within ``bound`` of ``ref`` element by element, and how close."""
    if got.shape != ref.shape:
        return False, f"shape {got.shape} != {ref.shape}"
    r = ref.astype(np.float64)
    err = np.abs(got.astype(np.float64) - r)
    rel = float(err.max() / max(float(np.abs(r).max()), 1e-30))
    used = float((err / np.maximum(bound, 1e-300)).max())
    return bool(np.all(err <= bound)), f"max rel {rel:.2g}, worst err/bound {used:.2g}"


def compare(c: Computed | None = None) -> list[tuple[str, str, str]]:
    """``(item, status, detail)`` per golden item; status ``DIFFERS`` is a broken contract."""
    c = c or compute()
    stored = json.loads(HASHES.read_text())
    rows = []
    for name, want in stored["exact"].items():
        got = c.exact.get(name)
        ok = got is not None and sha(got) == want
        rows.append((name, "identical" if ok else "DIFFERS", "" if ok else "hash differs"))
    with np.load(FACTORS) as ref:
        for name, want in stored["close"].items():
            got, bound = c.close[name]
            if sha(got) == want:
                rows.append((name, "identical", ""))
                continue
            ok, detail = within_bound(got, ref[name], bound)
            rows.append((name, "within tolerance" if ok else "DIFFERS", detail))
    return rows


def summary(rows: list[tuple[str, str, str]]) -> str:
    """Per-group counts (the group is an item name's first word) and every non-identical row."""
    groups: dict[str, dict[str, int]] = {}
    for name, status, _ in rows:
        g = groups.setdefault(name.split()[0], {})
        g[status] = g.get(status, 0) + 1
    lines = [f"{g:<12} " + ", ".join(f"{n} {s}" for s, n in sorted(st.items()))
             for g, st in groups.items()]
    lines += [f"  {name}: {status} {detail}" for name, status, detail in rows
              if status != "identical"]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_golden()
        print(f"wrote {HASHES} and {FACTORS}")
    else:
        result = compare()
        print(summary(result))
        sys.exit(1 if any(s == "DIFFERS" for _, s, _ in result) else 0)
