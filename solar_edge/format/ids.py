"""The one naming rule for ids that end up in file names, URLs and packet headers.

An adapter id (and a key file's base name) is 1 to 64 ASCII characters from
``A-Z a-z 0-9 . _ -`` that does not start with ``.`` or ``-``: safe as a single path
component on every file system and in a URL path, never ``.``, ``..`` or an option.
Packets, the repository and ``solar-edge keygen`` all check names with :func:`is_valid_id`.
"""

from __future__ import annotations

import re

MAX_ID_BYTES = 64
ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.' or '-'"
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def is_valid_id(text: object) -> bool:
    """True for a string that follows :data:`ID_RULE` (anything else, ``None`` included, is not)."""
    return isinstance(text, str) and _ID.fullmatch(text) is not None
