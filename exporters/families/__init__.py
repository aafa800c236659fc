"""Model families on the server side: one module per family, registered here with one line.

``load_model(spec)`` picks the family for the export stage; ``open_bundle_model(bundle)``
opens a bundle's own base model (the family named in its manifest, its weights checked
against the bundle) for the steps that run it on data: calibration and the refit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solar_edge.errors import CalibrationError, ExportError
from solar_edge.format.bundle import Bundle

from . import causal_lm, generic, text_encoder, vit
from .base import LoadedModel, TorchModel, check_matches_bundle


@dataclass(frozen=True)
class Family:
    name: str
    load_for_export: Callable[..., LoadedModel]
    open_model: Callable[[Path], TorchModel] | None = None   # None: cannot run on data here
    default_source: Callable[[dict[str, Any]], Path | None] = lambda identity: None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family


def _minilm_source(identity: dict[str, Any]) -> Path | None:
    is_default = identity.get("name") == text_encoder.DEFAULT_MODEL_NAME
    return text_encoder.default_model_dir() if is_default else None


register_family(Family(text_encoder.NAME, text_encoder.load_for_export, text_encoder.open_model,
                       _minilm_source))
register_family(Family(generic.NAME, generic.load_for_export))
register_family(Family(vit.NAME, vit.load_for_export, vit.open_model))
register_family(Family(causal_lm.NAME, causal_lm.load_for_export, causal_lm.open_model))


def load_model(spec: str | None) -> LoadedModel:
    """The model to export: ``None`` (the embedded MiniLM), a transformers directory, or
    ``module:function``. Raises :class:`ExportError`."""
    if spec is None:
        return text_encoder.load_for_export(text_encoder.default_model_dir(),
                                            name=text_encoder.DEFAULT_MODEL_NAME)
    path = Path(spec)
    if path.is_dir():
        family = vit.NAME if vit.claims(path) else text_encoder.NAME
        family = causal_lm.NAME if causal_lm.is_causal_lm(path) else family
        return FAMILIES[family].load_for_export(path)
    if ":" in spec and not path.exists():
        return FAMILIES[generic.NAME].load_for_export(spec)
    raise ExportError(f"model {spec!r} is neither a transformers directory nor 'module:function'")


def family_of(manifest: dict[str, Any]) -> Family:
    """The family a bundle was exported with (older manifests: by whether it has a tokenizer)."""
    name = manifest.get("model", {}).get("family")
    if name is None:
        name = text_encoder.NAME if manifest.get("tokenizer") else generic.NAME
    if name not in FAMILIES:
        raise ExportError(f"bundle model family {name!r} is not known here; "
                          f"known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def open_bundle_model(bundle: Bundle, model_dir: str | Path | None = None,
                      purpose: str = "calibration") -> TorchModel:
    """The bundle's base model in torch, checked weight by weight against the bundle."""
    family = family_of(bundle.manifest)
    if family.open_model is None:
        raise CalibrationError(f"{purpose} runs the base model on data; a {family.name} "
                               "bundle's model cannot be run that way")
    identity = bundle.manifest.get("model", {})
    source = Path(model_dir) if model_dir is not None else family.default_source(identity)
    if source is None:
        raise CalibrationError(f"{purpose} runs the bundle's base model "
                               f"({identity.get('name')!r}): give its directory (--model DIR)")
    model = family.open_model(source)
    check_matches_bundle(model.module, bundle, range(len(bundle.layers)))
    return model


__all__ = ["FAMILIES", "Family", "LoadedModel", "TorchModel", "family_of", "load_model",
           "open_bundle_model", "register_family"]
