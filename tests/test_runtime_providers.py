"""Execution-provider and mechanism choice per device profile: selection logic only.

No GPU here: ``available`` lists stand for what an onnxruntime-gpu / TensorRT build on a
Jetson reports; the sessions themselves are not created with those providers.
"""

from __future__ import annotations

import pytest

from solar_edge.errors import ProfileError
from solar_edge.profiles.device import load_profile
from solar_edge.runtime.backends.providers import (
    CPU,
    CUDA,
    TENSORRT,
    default_mechanism,
    select_providers,
)

JETSON_BUILD = [TENSORRT, CUDA, CPU]


@pytest.mark.parametrize(("profile", "available", "expected"), [
    ("jetson-orin-nano", JETSON_BUILD, [TENSORRT, CUDA, CPU]),
    ("jetson-orin-nano", [CUDA, CPU], [CUDA, CPU]),          # no TensorRT in this build
    ("jetson-orin-nano", [CPU], [CPU]),                      # CPU-only wheel on the board
    ("jetson-orin-nano", ["AzureExecutionProvider", CPU], [CPU]),
    ("x86-64", JETSON_BUILD, [CPU]),                         # profile wants CPU only
    ("rpi5", [CPU], [CPU]),
    ("rpi4", JETSON_BUILD, [CPU]),                           # XNNPACK/CPU: LiteRT names
])
def test_providers_follow_profile_and_build(profile, available, expected):
    assert select_providers(load_profile(profile).to_dict(), available) == expected


def test_providers_without_profile_and_bad_entries():
    assert select_providers(None, JETSON_BUILD) == [CPU]
    assert select_providers({"execution_providers": ["cuda", "cpu"]}, JETSON_BUILD) == [CUDA, CPU]
    with pytest.raises(ProfileError):
        select_providers({"execution_providers": "CUDAExecutionProvider"}, JETSON_BUILD)


def test_default_mechanism_per_profile():
    jetson = load_profile("jetson-orin-nano").to_dict()
    x86 = load_profile("x86-64").to_dict()
    gpu, cpu = select_providers(jetson, JETSON_BUILD), select_providers(x86, JETSON_BUILD)
    assert default_mechanism(jetson, gpu) == "lora" == default_mechanism(x86, cpu)
    # bundle without the lora graph variant: no in-place link on a GPU provider
    assert default_mechanism(jetson, gpu, frozenset()) == "recreate"
    assert default_mechanism(x86, cpu, frozenset({"inputs"})) == "initializer"
    assert default_mechanism({**x86, "patching": "iobinding"}, cpu) == "iobinding"
