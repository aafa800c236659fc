"""Pick and open a backend for a bundle and device profile: onnxruntime or LiteRT."""

from __future__ import annotations

from typing import Any

from solar_edge.errors import ProfileError
from solar_edge.runtime.bundle_parts import BundleParts
from solar_edge.runtime.providers import select_providers, uses_device_memory
from solar_edge.runtime.text import DEFAULT_MAX_LEN, TextEncoder

# Measured defaults (docs/runtime.md): on CPU the merged in-place initializer serves at the
# baked graph's speed and applies without a new session; on accelerators, where ORT copies
# initializers to device memory, the unmerged LoRA slots switch without re-creating.
DEFAULT_CPU = "initializer"
DEFAULT_DEVICE = "lora"


def default_mechanism(profile: dict[str, Any], providers: list[str]) -> str:
    if profile.get("patching"):
        return str(profile["patching"])
    return DEFAULT_DEVICE if uses_device_memory(providers) else DEFAULT_CPU


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
    name = mechanism or default_mechanism(profile, providers)
    if name not in GRAPH_VARIANT:
        raise ProfileError(f"unknown patching mechanism {name!r}; known: "
                           f"{', '.join([*GRAPH_VARIANT, 'tflite'])}")
    path = parts.graph_path(GRAPH_VARIANT[name])
    mech = create_mechanism(name, str(path), list(parts.slots.values()), parts.base, providers,
                            threads=threads)
    mech.encoder = TextEncoder(tok, DEFAULT_MAX_LEN) if tok else None
    return mech, name
