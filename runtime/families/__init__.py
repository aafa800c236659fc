"""Model families on the board: one module per family, registered here with one line each.

The bundle manifest names the family its model was exported with (``model.family``); a
family turns the caller's inputs (texts, arrays) into graph feeds, names a health input,
and picks from the graph outputs the hidden states (and mask) task heads pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from solar_edge.errors import BundleError
from solar_edge.runtime.backends.base import Backend
from solar_edge.runtime.bundle_parts import BundleParts
from solar_edge.runtime.families import causal_lm, generic, text_encoder, vit


class Family(Protocol):
    name: str
    health_input: Any

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]: ...

    def hidden(self, outputs: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray | None]: ...


FAMILIES: dict[str, Callable[[BundleParts, Backend], Family]] = {}


def register_family(name: str, make: Callable[[BundleParts, Backend], Family]) -> None:
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} is registered twice")
    FAMILIES[name] = make


register_family(text_encoder.NAME, lambda parts, backend: text_encoder.TextEncoderFamily(
    parts.tokenizer_json(), backend.input_names(), backend.fixed_seq_len))
register_family(generic.NAME, lambda parts, backend: generic.GenericFamily(
    parts.bundle.manifest["onnx"].get("inputs", [])))
register_family(vit.NAME, lambda parts, backend: vit.VitFamily(
    parts.bundle.manifest.get("model", {}), backend.input_names()))
register_family(causal_lm.NAME, lambda parts, backend: causal_lm.CausalLMFamily(
    parts.tokenizer_json(), parts.bundle.manifest.get("model", {}), backend.input_names()))


def family_name(manifest: Mapping[str, Any]) -> str:
    """The manifest's ``model.family`` (older bundles: by whether they carry a tokenizer)."""
    name = manifest.get("model", {}).get("family")
    if name is None:
        name = text_encoder.NAME if manifest.get("tokenizer") else generic.NAME
    return str(name)


def open_family(parts: BundleParts, backend: Backend) -> Family:
    name = family_name(parts.bundle.manifest)
    if name not in FAMILIES:
        raise BundleError(f"model family {name!r} is not known to this runtime; known: "
                          f"{', '.join(FAMILIES)}", path="manifest.json")
    return FAMILIES[name](parts, backend)
