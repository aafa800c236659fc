"""Execution-provider and patching-mechanism choice per device profile (onnxruntime), apart
from session code.

A device profile (``solar_edge/profiles/devices/*.toml``) lists ``execution_providers`` in order of
preference, e.g. TensorRT, CUDA, CPU on a Jetson. The runtime keeps those this onnxruntime
build offers, in that order, and always ends with the CPU provider, so a board without the
GPU build still serves. Names that are not onnxruntime providers (``XNNPACK`` in a TFLite
profile) are ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from solar_edge.errors import ProfileError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_SHORT = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}


def profile_providers(profile: Mapping[str, Any] | None) -> list[str]:
    """The profile's onnxruntime providers in preference order (``[CPU]`` when absent)."""
    if profile is None:
        return [CPU]
    raw = profile.get("execution_providers", [CPU])
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise ProfileError(f"execution_providers must be a list of names, got {raw!r}")
    names = [_SHORT.get(str(n).lower(), str(n)) for n in raw]
    return [n for n in names if n.endswith("ExecutionProvider")] or [CPU]


def select_providers(
    profile: Mapping[str, Any] | None, available: Sequence[str] | None = None
) -> list[str]:
    """Ordered providers for an ``InferenceSession``: wanted ones present here, then CPU."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    chosen = [p for p in profile_providers(profile) if p in available and p != CPU]
    return list(dict.fromkeys(chosen)) + [CPU]


def uses_device_memory(providers: Sequence[str]) -> bool:
    """True when the first provider keeps weights in accelerator memory (no CPU aliasing)."""
    return bool(providers) and providers[0] != CPU


# Measured defaults (docs/runtime.md, bench/runtime.py): the unmerged LoRA slots served
# MiniLM within 2-13% of the baked graph (in-place merged weights: 15-26%, no prepacking),
# switch in 0.1 ms and patch with the least memory; they also work on GPU providers, where
# ORT copies initializers to device memory and in-place patching cannot link. Without the
# lora graph variant: in-place initializers on CPU, session re-creation on accelerators.
PREFERRED = "lora"


def default_mechanism(profile: Mapping[str, Any], providers: Sequence[str],
                      variants: frozenset[str] = frozenset({"lora"})) -> str:
    """The profile's ``patching``, else the measured default for these providers and the
    bundle's graph variants."""
    if profile.get("patching"):
        return str(profile["patching"])
    if "lora-plain" in variants and not uses_device_memory(providers):
        return "lora-native"
    if "lora" in variants:
        return PREFERRED
    return "recreate" if uses_device_memory(providers) else "initializer"
