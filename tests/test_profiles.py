"""Device profiles: shipped TOML files, validation, and the budget rank rule."""

from __future__ import annotations

import pytest

from solar_edge.errors import ProfileError
from solar_edge.profiles.device import (
    BASIS_DTYPES,
    basis_bytes,
    choose_ranks,
    known_profiles,
    load_profile,
    profile_from_dict,
)

REQUIRED = ("rpi4", "rpi5", "jetson-orin-nano", "x86-64")
# MiniLM-L6: per layer q, k, v, attention.output (384x384), intermediate (1536x384),
# output (384x1536).
MINILM_SHAPES = [(384, 384)] * 4 * 6 + [(1536, 384)] * 6 + [(384, 1536)] * 6


def _raw(**over):
    raw = {"architecture": "aarch64", "memory_mb": 1024, "backend": "onnxruntime",
           "execution_providers": ["CPUExecutionProvider"], "basis_dtype": "float16",
           "basis_budget_mb": 1, "link": "wifi"}
    raw.update(over)
    return raw


def test_required_profiles_ship_and_load():
    assert set(REQUIRED) <= set(known_profiles())
    for name in REQUIRED:
        p = load_profile(name)
        assert p.name == name
        assert p.backend in ("onnxruntime", "tflite")
        assert p.execution_providers
        assert p.basis_dtype in BASIS_DTYPES
        assert 0 < p.basis_budget_mb <= p.memory_mb
        assert p.link
        assert p.to_dict()["name"] == name


def test_some_profile_uses_each_backend():
    backends = {load_profile(n).backend for n in REQUIRED}
    assert backends == {"onnxruntime", "tflite"}


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ProfileError) as exc:
        load_profile("pdp-11")
    msg = str(exc.value)
    assert "pdp-11" in msg
    for name in REQUIRED:
        assert name in msg


@pytest.mark.parametrize("field,value", [
    ("backend", "tensorflow"), ("basis_dtype", "bfloat16"), ("execution_providers", []),
    ("memory_mb", 0), ("basis_budget_mb", 4096), ("max_rank", 0),
])
def test_malformed_profiles_are_rejected(field, value):
    with pytest.raises(ProfileError):
        profile_from_dict("bad", _raw(**{field: value}))


def test_missing_field_is_named():
    raw = _raw()
    del raw["backend"]
    with pytest.raises(ProfileError, match="backend"):
        profile_from_dict("bad", raw)


def test_unknown_fields_are_kept_not_guessed():
    p = profile_from_dict("x", _raw(graph_variants=["lora"]))
    assert p.extra == {"graph_variants": ["lora"]}
    assert p.to_dict()["graph_variants"] == ["lora"]


def test_full_rank_where_the_budget_allows():
    p = load_profile("x86-64")
    assert choose_ranks(MINILM_SHAPES, p) == [min(s) for s in MINILM_SHAPES]


def test_budget_binds_with_the_largest_uniform_rank():
    p = profile_from_dict("small", _raw(basis_budget_mb=16))
    ranks = choose_ranks(MINILM_SHAPES, p)
    r = ranks[0]
    assert len(set(ranks)) == 1 and 1 <= r < 384
    budget = 16 << 20
    assert basis_bytes(MINILM_SHAPES, ranks, 2) <= budget
    assert basis_bytes(MINILM_SHAPES, [r + 1] * len(ranks), 2) > budget


def test_rank_is_capped_per_layer_and_by_max_rank():
    shapes = [(8, 4), (64, 64)]
    p = profile_from_dict("cap", _raw(basis_budget_mb=1))
    assert choose_ranks(shapes, p) == [4, 64]
    capped = profile_from_dict("cap", _raw(basis_budget_mb=1, max_rank=16))
    assert choose_ranks(shapes, capped) == [4, 16]


def test_budget_too_small_for_rank_one():
    huge = [(1 << 20, 1 << 10)]
    with pytest.raises(ProfileError, match="rank-1"):
        choose_ranks(huge, profile_from_dict("tiny", _raw(basis_budget_mb=1)))
