"""Philox4x32-10: published known answers, pinned golden streams, exactness of entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from solar_edge.format.records import PerturbationKind
from solar_edge.regen.prng import (
    perturbation_columns,
    philox4x32,
    random_words,
    words_to_perturbation,
)

GOLDEN = Path(__file__).resolve().parents[1] / "solar_edge" / "golden" / "prng_vectors.json"

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected output).
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("ctr", "key", "expected"), KATS)
def test_known_answer_vectors(ctr, key, expected):
    out = philox4x32(np.array([ctr], np.uint32), key)
    assert out.dtype == np.uint32
    assert tuple(int(x) for x in out[0]) == expected


def test_batched_rows_are_independent():
    ctrs = np.array([KATS[0][0], (1, 0, 0, 0), KATS[0][0]], np.uint32)
    out = philox4x32(ctrs, KATS[0][1])
    assert tuple(int(x) for x in out[0]) == KATS[0][2] == tuple(int(x) for x in out[2])
    assert tuple(int(x) for x in out[1]) != KATS[0][2]


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_words():
    cases = _golden()["words"]
    assert len(cases) >= 5
    for case in cases:
        words = random_words(case["seed"], case["layer_id"], case["stream"], case["start"],
                             case["count"])
        assert [f"{int(w):08x}" for w in words] == case["words"], case


def test_golden_perturbations_bit_exact():
    cases = _golden()["perturbations"]
    assert {c["kind"] for c in cases} == {"RADEMACHER", "UNIFORM"}
    for case in cases:
        vals = perturbation_columns(
            case["seed"], case["layer_id"], case["stream"], case["n_rows"],
            np.array(case["columns"]), PerturbationKind[case["kind"]],
        )
        bits = [f"{int(b):08x}" for b in vals.view(np.uint32).ravel()]
        assert bits == case["values_f32"], case


def test_golden_file_matches_generator():
    """The committed file is exactly what the script writes (no hand edits)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_prng_golden.py"
    spec = importlib.util.spec_from_file_location("make_prng_golden", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == _golden()


def test_start_offset_is_a_slice_of_the_stream():
    full = random_words(77, 2, 3, 0, 40)
    for start in (0, 1, 3, 4, 13):
        assert np.array_equal(random_words(77, 2, 3, start, 40 - start), full[start:])


def test_keys_separate_streams():
    a = random_words(5, 1, 0, 0, 64)
    assert not np.array_equal(a, random_words(5, 1, 1, 0, 64))
    assert not np.array_equal(a, random_words(5, 2, 0, 0, 64))
    assert not np.array_equal(a, random_words(6, 1, 0, 0, 64))
    assert not np.array_equal(a, random_words(5 + 2**32, 1, 0, 0, 64))


@pytest.mark.parametrize("kind", list(PerturbationKind))
@pytest.mark.parametrize("n_rows", [1, 3, 4, 5, 64, 97])
def test_column_subset_equals_full_matrix(kind, n_rows):
    full = perturbation_columns(123, 4, 7, n_rows, np.arange(40), kind)
    cols = np.array([39, 0, 17, 17, 2, 31])
    sub = perturbation_columns(123, 4, 7, n_rows, cols, kind)
    assert np.array_equal(sub, full[:, cols])
    # and the matrix is the stream laid out column by column
    stream = words_to_perturbation(random_words(123, 4, 7, 0, 40 * n_rows), kind)
    assert np.array_equal(full, stream.reshape(40, n_rows).T)


def test_rademacher_values_are_exactly_signs():
    p = perturbation_columns(2**64 - 1, 9, 1, 256, np.arange(64), PerturbationKind.RADEMACHER)
    assert p.dtype == np.float32
    assert set(np.unique(p).tolist()) == {-1.0, 1.0}
    assert abs(float(p.mean())) < 0.02


def test_uniform_values_are_exact_dyadics_in_range():
    p = perturbation_columns(31337, 0, 0, 512, np.arange(64), PerturbationKind.UNIFORM)
    assert p.dtype == np.float32
    assert p.min() >= -1.0 and p.max() < 1.0
    scaled = p.astype(np.float64) * 2.0**23
    assert np.array_equal(scaled, np.round(scaled))
    assert abs(float(p.mean())) < 0.02
    assert len(np.unique(p)) > 30000


def test_uniform_extremes_of_the_word_range():
    w = np.array([0, 0xFF, 0x100, 0xFFFFFFFF], np.uint32)
    u = words_to_perturbation(w, PerturbationKind.UNIFORM)
    assert u.tolist() == [-1.0, -1.0, -1.0 + 2.0**-23, 1.0 - 2.0**-23]


def test_empty_and_invalid_requests():
    assert perturbation_columns(1, 0, 0, 8, np.array([], np.int64)).shape == (8, 0)
    with pytest.raises(ValueError):
        perturbation_columns(1, 0, 0, 8, np.array([-1]))
    with pytest.raises(ValueError):
        perturbation_columns(2**64, 0, 0, 8, np.array([0]))
    with pytest.raises(ValueError):
        random_words(1, 2**32, 0, 0, 4)
