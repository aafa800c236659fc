"""A packet's metadata: one canonical JSON encoding, and typed checks of the known fields.

The metadata is a small JSON object (task name, label names, task-head seed, ...). Only
one byte string is accepted for a given object: sorted keys, no spaces, UTF-8, no NaN or
Infinity, no duplicate keys. Known fields must have their type and range (below); other
fields are kept as they are, so newer writers can add information older readers ignore.
Every failure is an :class:`~solar_edge.errors.InvalidFieldError` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from solar_edge.errors import InvalidFieldError

MAX_LABELS = 4096
MAX_LABEL_CHARS = 256
FIELD = "header.metadata"


def canonical_metadata(metadata: dict[str, Any]) -> bytes:
    """The only accepted metadata bytes: sorted keys, no spaces, UTF-8, no NaN/Infinity."""
    try:
        text = json.dumps(
            metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")  # lone surrogates fail here, inside the try
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidFieldError(f"not JSON-serialisable: {exc}", field=FIELD) from exc


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """Hostile bytes -> a checked metadata object (see the module docstring)."""

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidFieldError(f"not UTF-8 JSON: {exc}", field=FIELD) from exc
    if not isinstance(obj, dict):
        raise InvalidFieldError("must be a JSON object", field=FIELD)
    if canonical_metadata(obj) != raw:
        raise InvalidFieldError("not in canonical form (sorted keys, no spaces, no duplicates)",
                                field=FIELD)
    check_metadata(obj)
    return obj


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _labels(value: Any) -> str | None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LABELS:
        return f"must be a list of 1..{MAX_LABELS} strings"
    if not all(isinstance(v, str) and 1 <= len(v) <= MAX_LABEL_CHARS for v in value):
        return f"every label must be a string of 1..{MAX_LABEL_CHARS} characters"
    if len(set(value)) != len(value):
        return "labels must be unique"
    return None


def _u64(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        return "must be an integer in 0..2**64-1"
    return None


MAX_HEAD_TENSORS = 16
MAX_HEAD_DIM = 1 << 16


def _head(value: Any) -> str | None:
    """A trained task head: ``type`` (what the runtime computes) and its ``tensors``, each
    ``{"name": str, "shape": [d] or [d0, d1]}``; carried by HEAD_TENSOR records in order."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        return 'must be an object with a "type" string'
    tensors = value.get("tensors")
    if not isinstance(tensors, list) or not 1 <= len(tensors) <= MAX_HEAD_TENSORS:
        return f'"tensors" must be a list of 1..{MAX_HEAD_TENSORS} tensors'
    for t in tensors:
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or \
                not isinstance(shape, list) or not 1 <= len(shape) <= 2 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and
                        1 <= d <= MAX_HEAD_DIM for d in shape):
            return (f'each tensor needs a "name" string and a "shape" of 1 or 2 integers in '
                    f"1..{MAX_HEAD_DIM}")
    return None


MAX_CANARY = 16


def _canary(value: Any) -> str | None:
    """Expected output digest of the bundle's canary inputs (:mod:`solar_edge.regen.canary`)."""
    if not isinstance(value, dict):
        return 'must be an object with "digest" and "tolerance"'
    tol, rows = value.get("tolerance"), value.get("digest")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol <= 1:
        return '"tolerance" must be a number in (0, 1]'
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_CANARY or not all(
            isinstance(r, list) and 1 <= len(r) <= MAX_CANARY and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
            for r in rows):
        return f'"digest" must be 1..{MAX_CANARY} lists of 1..{MAX_CANARY} numbers'
    return None


KNOWN_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "task": _string,
    "labels": _labels,
    "head_seed": _u64,
    "head": _head,
    "canary": _canary,
}


def check_metadata(metadata: Any) -> None:
    """Raise :class:`InvalidFieldError` unless ``metadata`` is a dict whose known fields hold."""
    if not isinstance(metadata, dict):
        raise InvalidFieldError("must be a JSON object (dict)", field=FIELD)
    for key, check in KNOWN_FIELDS.items():
        if key in metadata:
            problem = check(metadata[key])
            if problem:
                raise InvalidFieldError(problem, field=f"{FIELD}.{key}")
    if "head_seed" in metadata and "labels" not in metadata:
        raise InvalidFieldError("a task head needs 'labels'", field=f"{FIELD}.head_seed")
