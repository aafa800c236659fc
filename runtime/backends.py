"""Pick and open a backend for a bundle and device profile: onnxruntime or LiteRT."""

from __future__ import annotations

from typing import Any

from solar_edge.errors import ProfileError
from solar_edge.runtime.bundle_parts import BundleParts
from solar_edge.runtime.providers import select_providers, uses_device_memory
from solar_edge.runtime.text import DEFAULT_MAX_LEN, TextEncoder

# Measured defaults (docs/runtime.md, bench/runtime.py): the unmerged LoRA slots served
# MiniLM within 2-6% of the baked graph (in-place merged weights: 23-26%, no prepacking),
# switch in 0.1 ms and patch with the least memory; they also work on GPU providers, where
# ORT copies initializers to device memory and in-place patching cannot link. Without the
# lora graph variant: in-place initializers on CPU, session re-creation on accelerators.
PREFERRED = "lora"


def default_mechanism(profile: dict[str, Any], providers: list[str],
                      variants: frozenset[str] = frozenset({"lora"})) -> str:
    if profile.get("patching"):
        return str(profile["patching"])
    if "lora" in variants:
        return PREFERRED
    return "recreate" if uses_device_memory(providers) else "initializer"


def open_backend(parts: BundleParts, mechanism: str | None, threads: int = 0) -> tuple[Any, str]:
    """``(backend, mechanism name)``; ``tflite`` when asked for or the profile says so."""
    profile = parts.profile
    tok = parts.tokenizer_json()
    wants_tflite = mechanism == "tflite" or (
        mechanism is None and profile.get("backend") == "tflite"
    )
    if wants_tflite and parts.bundle.tflite_path is not None:
        from solar_edge.runtime.backends_tflite import TfliteBackend

        backend = TfliteBackend(parts, threads=threads)
        seq_len = backend.seq_len or int(profile.get("tflite_seq_len", DEFAULT_MAX_LEN))
        backend.encoder = TextEncoder(tok, seq_len, fixed=True) if tok else None
        return backend, "tflite"
    if mechanism == "tflite":
        raise ProfileError("mechanism 'tflite' needs a .tflite graph in the bundle")
    from solar_edge.runtime.backends_ort import GRAPH_VARIANT, create_mechanism

    providers = select_providers(profile)
    variants = frozenset(parts.bundle.manifest["onnx"].get("variants") or {})
    name = mechanism or default_mechanism(profile, providers, variants)
    if name not in GRAPH_VARIANT:
        raise ProfileError(f"unknown patching mechanism {name!r}; known: "
                           f"{', '.join([*GRAPH_VARIANT, 'tflite'])}")
    path = parts.graph_path(GRAPH_VARIANT[name])
    mech = create_mechanism(name, str(path), list(parts.slots.values()), parts.base, providers,
                            threads=threads)
    mech.encoder = TextEncoder(tok, DEFAULT_MAX_LEN) if tok else None
    return mech, name
