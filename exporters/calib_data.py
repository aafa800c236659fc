"""Calibration inputs for the data-driven encoder steps: a user's file, or a built-in task.

``read_calibration_file(path)`` reads

* ``.txt``: one text per line (blank lines skipped), unlabelled;
* ``.jsonl``: one JSON object per line with ``"text"`` (a string) and an optional ``"label"``
  (a label name the adapter's head knows, or its index); every line labelled or none;
* a folder: unlabelled images (PNG, JPEG, ``.npy``) for an image model, read as the board
  reads them (:mod:`solar_edge.runtime.images`); the inputs are then pixel arrays;
* a folder of folders, one per label (``eval/five/*.png``, ``eval/six/*.png``: each folder
  named by a label name the adapter's head knows, or by its index): labelled images.

The project's own adapters name a built-in task in their ``task.json``; :func:`from_task`
takes that task's training split (test material: no product path needs it). Every problem
is a :class:`~solar_edge.errors.CalibrationError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solar_edge.errors import CalibrationError

MAX_FILE_BYTES = 256 << 20
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True)
class CalibrationSet:
    texts: list[Any]           # texts, or raw image arrays (a folder of images)
    labels: list[int] | None   # None: unlabelled
    source: str                # what it was read from, for messages

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int) -> CalibrationSet:
        """At most ``n`` inputs, evenly spaced over the set (deterministic)."""
        if n >= len(self.texts):
            return self
        step = len(self.texts) / n
        idx = [int(i * step) for i in range(n)]
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return CalibrationSet([self.texts[i] for i in idx], labels, self.source)

    def split(self, held: float) -> tuple[CalibrationSet, CalibrationSet]:
        """(the rest, every ``1/held``-th input held back), deterministic."""
        step = max(2, round(1 / held))
        keep = [i for i in range(len(self.texts)) if i % step]
        back = [i for i in range(len(self.texts)) if not i % step]

        def pick(idx: list[int], what: str) -> CalibrationSet:
            labels = None if self.labels is None else [self.labels[i] for i in idx]
            return CalibrationSet([self.texts[i] for i in idx], labels,
                                  f"{self.source} ({what})")

        return pick(keep, "calibration part"), pick(back, "held-back part")

    def require(self, n: int, purpose: str) -> None:
        if len(self.texts) < n:
            raise CalibrationError(f"{purpose} needs at least {n} calibration texts; "
                                   f"{self.source} has {len(self.texts)}")


def _lines(path: Path) -> list[str]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc.strerror})") from exc
    if size > MAX_FILE_BYTES:
        raise CalibrationError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    data = path.read_bytes()
    if b"\0" in data:
        raise CalibrationError(f"{path}: binary data (NUL bytes), not a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    return text.splitlines()


def _label_index(value: Any, names: Sequence[str] | None, where: str) -> int:
    if isinstance(value, bool):
        raise CalibrationError(f"{where}: label {value!r} is neither a name nor an index")
    if isinstance(value, int):
        if names is not None and not 0 <= value < len(names):
            raise CalibrationError(f"{where}: label index {value} is outside the adapter's "
                                   f"{len(names)} labels")
        return value
    if isinstance(value, str):
        if names is None:
            raise CalibrationError(f"{where}: label {value!r} given, but the adapter has no "
                                   "label names")
        if value not in names:
            raise CalibrationError(f"{where}: label {value!r} is not one of the adapter's "
                                   f"labels {list(names)[:10]}")
        return list(names).index(value)
    raise CalibrationError(f"{where}: label {value!r} is neither a name nor an index")


def read_calibration_file(path: str | Path,
                          label_names: Sequence[str] | None = None) -> CalibrationSet:
    """Texts (and labels) from a ``.txt`` or ``.jsonl`` file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _image_folder(path, label_names)
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibrationError(f"{path}: calibration data must be .txt or .jsonl")
    texts: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(_lines(path), 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if path.suffix == ".txt":
            texts.append(line.strip()[:MAX_TEXT_CHARS])
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationError(f'{where}: each line needs a "text" string')
        texts.append(obj["text"][:MAX_TEXT_CHARS])
        if "label" in obj:
            labels.append(_label_index(obj["label"], label_names, where))
    if not texts:
        raise CalibrationError(f"{path}: no texts")
    if labels and len(labels) != len(texts):
        raise CalibrationError(f"{path}: {len(labels)} of {len(texts)} lines have a label; "
                               "label all of them or none")
    return CalibrationSet(texts, labels or None, str(path))


def _image_folder(path: Path, label_names: Sequence[str] | None) -> CalibrationSet:
    from solar_edge.errors import ImageError
    from solar_edge.runtime.images import read_images

    folders = sorted(p for p in path.iterdir() if p.is_dir())
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if folders and files:
        raise CalibrationError(f"{path}: images and label folders side by side; give either "
                               "images only (unlabelled) or one folder per label")
    try:
        if not folders:
            _, images = read_images([path])
            return CalibrationSet(list(images), None, f"{path} ({len(images)} images)")
        texts: list[Any] = []
        labels: list[int] = []
        for folder in folders:
            label = _folder_label(folder.name, label_names, str(folder))
            _, images = read_images([folder])
            texts += images
            labels += [label] * len(images)
    except ImageError as exc:
        raise CalibrationError(f"calibration images: {exc}") from exc
    return CalibrationSet(texts, labels, f"{path} ({len(texts)} images in "
                                         f"{len(folders)} label folders)")


def _folder_label(name: str, names: Sequence[str] | None, where: str) -> int:
    """A label folder's label: its name, or its name read as an index."""
    if names is not None and name in names:
        return list(names).index(name)
    if name.isdecimal() and name.isascii():
        return _label_index(int(name), names, where)
    return _label_index(name, names, where)


def from_task(task_meta: dict[str, Any]) -> CalibrationSet | None:
    """The training split of the built-in task an adapter's ``task.json`` names, if any."""
    name = task_meta.get("task")
    if not name:
        return None
    from solar_edge.exporters.tasks import TASKS, load_task

    if name not in TASKS:
        return None
    train = load_task(name).train
    return CalibrationSet(list(train.texts), list(train.labels), f"built-in task {name!r}")
