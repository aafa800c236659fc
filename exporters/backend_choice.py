"""Which graph backend an export targets: the profile's default or ``--backend``.

Checked before any model is loaded, so a missing optional converter is refused at once
instead of after the SVDs and the ONNX export. No torch import here.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from solar_edge.errors import ExportError
from solar_edge.profiles.device import DeviceProfile

CHOICES = {"onnx": "onnxruntime", "tflite": "tflite"}   # CLI name -> profile backend


def tflite_converter_available() -> bool:
    """Whether the optional TFLite converter (``litert-torch``) is installed."""
    return importlib.util.find_spec("litert_torch") is not None


def resolve_backend(profile: DeviceProfile, choice: str | None = None) -> DeviceProfile:
    """``profile`` with its backend overridden by ``choice`` (``onnx`` | ``tflite``), if given.

    Raises :class:`ExportError` for an unknown choice, or when the result needs the TFLite
    converter and it is not installed.
    """
    if choice is not None:
        if choice not in CHOICES:
            raise ExportError(f"backend must be one of {sorted(CHOICES)}, got {choice!r}")
        profile = dataclasses.replace(profile, backend=CHOICES[choice])
    if profile.backend == "tflite" and not tflite_converter_available():
        origin = "--backend tflite" if choice else f"profile {profile.name!r} defaults to tflite"
        raise ExportError(f"{origin} but the TFLite converter is not installed: "
                          "pip install 'solar-edge[convert]' (litert-torch), "
                          "or export the ONNX graph only with --backend onnx")
    return profile
