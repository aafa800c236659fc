"""Staged rollout: which devices take a target now, decided on the device from its id alone.

A target's custom info may carry ``"rollout": "f"`` (0 < f <= 1, written by ``solar-edge
publish --rollout f``; a decimal string of at most 6 places, because TUF's canonical JSON
has no floats; absent means 1). A device installs it only if :func:`rollout_bucket` of its device
id, the adapter id and the version is below ``f``. The bucket is a pure function, uniform
in [0, 1), stable across restarts and independent between versions, so raising ``f``
only ever adds devices: one that was eligible at 0.1 stays eligible at 0.5.
"""

from __future__ import annotations

import hashlib
import math
import re

from solar_edge.errors import RepositoryError


def rollout_bucket(device_id: str, adapter_id: str, version: int) -> float:
    """First 8 bytes (big-endian) of sha256(f"{device_id}\\0{adapter_id}\\0{version}") / 2**64."""
    digest = hashlib.sha256(f"{device_id}\0{adapter_id}\0{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_fraction(value: object, where: str = "rollout") -> float:
    """``value`` as a rollout fraction, or RepositoryError if it is not a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 < value <= 1:
        raise RepositoryError(f"{where} must be a number with 0 < f <= 1, got {value!r:.40}")
    return float(value)


_DECIMAL = re.compile(r"[01](\.[0-9]{1,6})?")


def fraction_text(fraction: float) -> str:
    """The stored form of a fraction: a decimal string with at most 6 places ("0.25", "1")."""
    text = f"{check_fraction(fraction):.6f}".rstrip("0").rstrip(".")
    check_fraction(float(text), f"rollout {fraction!r} rounded to 6 places")
    return text


def parse_fraction(value: object) -> float:
    """The fraction a target's custom ``rollout`` says (absent: 1); RepositoryError otherwise."""
    if value is None:
        return 1.0
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return check_fraction(float(value), "custom.rollout")
    if type(value) is int:
        return check_fraction(value, "custom.rollout")
    raise RepositoryError(f"custom.rollout must be a decimal string like \"0.25\", got "
                          f"{value!r:.40}")


def eligible(device_id: str, adapter_id: str, version: int, fraction: float) -> bool:
    return rollout_bucket(device_id, adapter_id, version) < fraction
