"""Inference backends, registered here with one line each, picked by device profile.

A device profile names its ``backend`` (``onnxruntime``, ``tflite``); each backend offers
patching mechanisms (:data:`BackendSpec.mechanisms`). ``open_backend`` opens the profile's
backend with its default mechanism, or the backend that offers an explicitly asked-for
mechanism. Nothing else in the runtime tests backend names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from solar_edge.errors import ProfileError
from solar_edge.runtime.backends import onnxruntime, tflite
from solar_edge.runtime.backends.base import Backend
from solar_edge.runtime.bundle_parts import BundleParts


@dataclass(frozen=True)
class BackendSpec:
    name: str                                   # the profile's ``backend`` value
    mechanisms: tuple[str, ...]                 # patching mechanisms it offers
    open: Callable[[BundleParts, str | None, int], Backend]  # (parts, mechanism, threads)
    usable: Callable[[BundleParts], bool]       # does this bundle carry what it needs?


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> None:
    if spec.name in BACKENDS:
        raise ValueError(f"backend {spec.name!r} is registered twice")
    BACKENDS[spec.name] = spec


register_backend(BackendSpec("onnxruntime", onnxruntime.MECHANISMS, onnxruntime.open_backend,
                             lambda parts: True))
register_backend(BackendSpec("tflite", tflite.MECHANISMS, tflite.open_backend,
                             lambda parts: parts.bundle.tflite_path is not None))

FALLBACK = "onnxruntime"  # every bundle has an ONNX graph


def mechanisms() -> list[str]:
    """Every patching mechanism of every registered backend."""
    return [m for spec in BACKENDS.values() for m in spec.mechanisms]


def open_backend(parts: BundleParts, mechanism: str | None, threads: int = 0) -> Backend:
    """The backend for ``mechanism``, else the profile's backend (ONNX if the bundle lacks
    its graph), opened with that backend's default mechanism for the profile."""
    if mechanism is not None:
        spec = next((s for s in BACKENDS.values() if mechanism in s.mechanisms), None)
        if spec is None:
            raise ProfileError(f"unknown patching mechanism {mechanism!r}; known: "
                               f"{', '.join(mechanisms())}")
        if not spec.usable(parts):
            raise ProfileError(f"mechanism {mechanism!r} needs the bundle's {spec.name} graph, "
                               "which this bundle does not have")
        return spec.open(parts, mechanism, threads)
    wanted = str(parts.profile.get("backend", FALLBACK))
    spec = BACKENDS.get(wanted)
    if spec is None:
        raise ProfileError(f"profile backend {wanted!r} is not one of {', '.join(BACKENDS)}")
    if not spec.usable(parts):
        spec = BACKENDS[FALLBACK]
    return spec.open(parts, None, threads)


__all__ = ["BACKENDS", "Backend", "BackendSpec", "mechanisms", "open_backend",
           "register_backend"]
