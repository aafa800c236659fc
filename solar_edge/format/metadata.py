"""A packet's metadata: one canonical JSON encoding, and typed checks of the known fields.

The metadata is a small JSON object (task name, label names, task-head seed, ...). Only
one byte string is accepted for a given object: sorted keys, no spaces, UTF-8, no NaN or
Infinity, no duplicate keys. Every value, known field or not, keeps to the value rules of
:func:`check_values` (printable strings, integers within 64 bits, nesting depth at most
:data:`MAX_DEPTH`); known fields must also have their type and range (below); other fields
are kept as they are, so newer writers can add information older readers ignore.
Every failure is an :class:`~solar_edge.errors.InvalidFieldError` naming the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from solar_edge.errors import InvalidFieldError

MAX_LABELS = 4096
MAX_LABEL_CHARS = 256
MAX_DEPTH = 16  # of nested lists/objects (the known fields need 4)
MIN_INT, MAX_INT = -(2**63), 2**64 - 1
# control characters (C0, DEL, C1), surrogates, the non-characters U+FFFE/U+FFFF and the
# bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): text a
# terminal, a log line or a C string on the board could misread, or show in another order
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff\u202a-\u202e\u2066-\u2069]")
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


def _value_problem(value: Any) -> str | None:
    if isinstance(value, str):
        bad = _UNPRINTABLE.search(value)
        return None if bad is None else f"string holds the unprintable {bad.group()!r}"
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if MIN_INT <= value <= MAX_INT else "integer outside -2**63..2**64-1"
    if isinstance(value, float):
        return None if math.isfinite(value) else "number is not finite"
    return f"{type(value).__name__} is not a JSON value"


def check_values(metadata: dict[str, Any]) -> None:
    """Every key and value at any depth (iteratively: no recursion on hostile nesting); a
    failure names the field ``header.metadata`` and, in its message, where it is."""
    stack: list[tuple[Any, str, int]] = [(metadata, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        at = f"at {where or 'top level'}: "
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise InvalidFieldError(f"{at}nested deeper than {MAX_DEPTH}", field=FIELD)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(value, dict):
                    problem = "key is not a string" if not isinstance(key, str) else \
                        _value_problem(key)
                    if problem:
                        raise InvalidFieldError(f"{at}key: {problem}", field=FIELD)
                step = f".{key}" if isinstance(value, dict) else f"[{key}]"
                stack.append((item, (where + step).lstrip(".")[:80], depth + 1))
            continue
        problem = _value_problem(value)
        if problem:
            raise InvalidFieldError(at + problem, field=FIELD)


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
HEAD_NAMES = ("weight", "bias", "pooler")  # tensor names (or a name prefix) the head reads
HEAD_WORDS = ("pooling", "activation")


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
    if len({t["name"] for t in tensors}) != len(tensors):
        return "tensor names must be unique"
    for key in HEAD_NAMES:
        if value.get(key) is not None and not isinstance(value[key], str):
            return f'"{key}" must be a tensor name (string) or null'
    for key in HEAD_WORDS:
        if key in value and not isinstance(value[key], str):
            return f'"{key}" must be a string'
    return None


MAX_CANARY = 16


def _digest(value: Any) -> str | None:
    """A vouch: the expected output digest of the bundle's canary inputs (``canary``,
    :mod:`solar_edge.regen.canary`) or of the decoded update (``update_digest``,
    :mod:`solar_edge.regen.update_digest`)."""
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
    if len({len(r) for r in rows}) != 1:
        return '"digest" rows must all have the same length'
    if not all(abs(v) <= 1e300 for r in rows for v in r):
        return '"digest" numbers must be within +-1e300'
    return None


KNOWN_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "task": _string,
    "labels": _labels,
    "head_seed": _u64,
    "head": _head,
    "canary": _digest,
    "update_digest": _digest,
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
    check_values(metadata)
    if "head_seed" in metadata and "labels" not in metadata:
        raise InvalidFieldError("a task head needs 'labels'", field=f"{FIELD}.head_seed")
