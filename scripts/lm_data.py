"""Offline text of every machine for the project's own decoder (scripts/pretrain_lm.py and
scripts/train_lm_adapters.py): the Python standard library's source and pydoc's topics.

Splits are fixed (sorted paths and topic names, every n-th held out), so every run and every
machine with the same Python sees the same text:

* ``pretrain``: stdlib ``.py`` source (no test suites, not the ``email`` package) and 60 % of
  the pydoc topics; ``pretrain-heldout`` is every 25th source file of the same kind;
* ``docs``: the other 40 % of the pydoc topics (prose the pretraining never saw), every 5th
  topic held out;
* ``email``: the ``email`` package's source (one family of modules the pretraining never
  saw), every 5th file held out.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "email"}
DOMAINS = ("docs", "email")


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files() -> list[Path]:
    root = stdlib()
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_PARTS & set(p.relative_to(root).parts[:-1]))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def texts(split: str) -> list[str]:
    """Documents of one split (see the module docstring)."""
    if split in ("pretrain", "pretrain-heldout"):
        files = _source_files()
        held = split == "pretrain-heldout"
        code = [_read(p) for i, p in enumerate(files) if (i % 25 == 0) == held]
        topics = _topics()
        cut = int(len(topics) * 0.6)
        return code if held else code + topics[:cut]
    if split.split("-")[0] in DOMAINS:
        domain, _, part = split.partition("-")
        if domain == "docs":
            topics = _topics()
            docs = topics[int(len(topics) * 0.6):]
        else:
            docs = [_read(p) for p in sorted((stdlib() / "email").rglob("*.py"))]
        if part not in ("train", "heldout"):
            raise ValueError(f"split {split!r}: use {domain}-train or {domain}-heldout")
        return [d for i, d in enumerate(docs) if (i % 5 == 4) == (part == "heldout")]
    raise ValueError(f"unknown split {split!r}")
