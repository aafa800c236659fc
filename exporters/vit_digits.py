"""scikit-learn's handwritten digits as a small image benchmark for the ``vit`` family.

``load_digits`` (1797 gray 8x8 images, values 0-16, shipped with scikit-learn) upsampled
2x (nearest) to 16x16 and scaled to 0-255 ``uint8``; one fixed split (70% train, 30%
held out, seed 0). Pretraining classifies digits 0-4; the adapter tasks differ from it:

* ``digits-5-9``: classify the other half of the classes (5-9), never seen in pretraining;
* ``inverted``: all ten digits, drawn white-on-black inverted (``255 - x``).

Test and benchmark material only (``scripts/pretrain_vit.py``); no product path needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 16
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ImageSplit:
    images: np.ndarray   # (n, 16, 16) uint8
    labels: np.ndarray   # (n,) int64, indices into the task's label names


@dataclass(frozen=True)
class ImageTask:
    name: str
    labels: list[str]
    train: ImageSplit
    test: ImageSplit


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All digits as (images uint8 16x16, labels, is_train) with the fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.kron(data.images, np.ones((2, 2)))          # 8x8 -> 16x16, nearest
    images = np.rint(images * 255.0 / 16.0).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    is_train = np.zeros(len(images), bool)
    is_train[order[: int(0.7 * len(images))]] = True
    return images, data.target.astype(np.int64), is_train


def _split(images: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> ImageSplit:
    return ImageSplit(np.ascontiguousarray(images[keep]), labels[keep])


def pretrain_task() -> ImageTask:
    images, labels, is_train = digits()
    mine = np.isin(labels, PRETRAIN_CLASSES)
    return ImageTask("digits-0-4", list(NAMES[:5]), _split(images, labels, mine & is_train),
                     _split(images, labels, mine & ~is_train))


def task(name: str) -> ImageTask:
    images, labels, is_train = digits()
    if name == "digits-5-9":
        mine = labels >= 5
        return ImageTask(name, list(NAMES[5:]), _split(images, labels - 5, mine & is_train),
                         _split(images, labels - 5, mine & ~is_train))
    if name == "inverted":
        inverted = (255 - images).astype(np.uint8)
        return ImageTask(name, list(NAMES), _split(inverted, labels, is_train),
                         _split(inverted, labels, ~is_train))
    raise KeyError(f"no image task {name!r}; known: digits-5-9, inverted")


TASKS = ("digits-5-9", "inverted")
