"""The offline text tasks: real sources, deterministic splits, no leakage."""

from __future__ import annotations

import random

import pytest

from solar_edge.exporters.tasks import (
    DOC_FAMILIES,
    MIN_WORDS,
    TASKS,
    accuracy_ci,
    build_task,
    load_task,
    normalise,
)


@pytest.fixture(scope="module", params=sorted(TASKS))
def task(request):
    return load_task(request.param)


def test_splits_are_disjoint_deduplicated_and_labelled(task):
    train, test = set(task.train.texts), set(task.test.texts)
    assert len(train) == len(task.train) and len(test) == len(task.test)
    assert not train & test
    assert all(0 <= lab < task.num_labels for lab in task.train.labels + task.test.labels)
    assert all(len(t.split()) >= MIN_WORDS for t in task.train.texts + task.test.texts)


def test_every_label_has_held_out_examples(task):
    # Enough per class that accuracy means something: at least 50 held-out examples each.
    assert min(task.test.counts(task.num_labels)) >= 50
    assert min(task.train.counts(task.num_labels)) >= 30
    assert len(task.test) > len(task.train)  # the held-out set is the larger one


def test_tasks_are_rebuilt_identically(task):
    again = load_task(task.name)
    assert again.train == task.train and again.test == task.test


def test_docstring_families_cover_real_stdlib_text():
    task = load_task("stdlib-docs")
    assert task.label_names == tuple(DOC_FAMILIES)
    texts = task.train.texts + task.test.texts
    assert len(texts) > 2000
    # A docstring from each family's core module is present with its label.
    pairs = set(zip(texts, task.train.labels + task.test.labels, strict=True))
    import json
    import math

    expect = {normalise(math.sqrt.__doc__): "numeric", normalise(json.dumps.__doc__): "formats"}
    for text, family in expect.items():
        assert (text, task.label_names.index(family)) in pairs


def test_split_depends_on_text_only_and_conflicts_are_dropped():
    items = [(f"sentence number {i} with enough words in it", "a" if i % 2 else "b")
             for i in range(200)]
    items.append(("a text that appears under both labels here", "a"))
    items.append(("a text that appears under both labels here", "b"))
    items.append(("too short", "a"))
    one = build_task("t", items, ["a", "b"], 0.5, "test")
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    two = build_task("t", shuffled, ["a", "b"], 0.5, "test")
    assert one.train == two.train and one.test == two.test
    every = one.train.texts + one.test.texts
    assert len(every) == 200
    assert "a text that appears under both labels here" not in every
    assert 60 < len(one.train) < 140  # a hash split near the requested fraction


def test_wilson_interval_known_values():
    acc, lo, hi = accuracy_ci(50, 100)
    assert acc == 0.5
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    _, lo, hi = accuracy_ci(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.9630, abs=1e-4)
    _, lo_small, hi_small = accuracy_ci(8, 10)
    _, lo_big, hi_big = accuracy_ci(800, 1000)
    assert hi_small - lo_small > hi_big - lo_big
    with pytest.raises(ValueError):
        accuracy_ci(0, 0)
