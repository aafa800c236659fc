"""Model outputs of the tiny GPT-2 bundle against the x86-64 golden outputs (board test set).

On a board the check script passes a bundle exported on the host (``SOLAR_BOARD_BUNDLE``);
elsewhere the session's tiny bundle is exported here (needs torch, else skipped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from model_golden import MODEL, OUTPUT_RTOL, compare, model_packet


@pytest.fixture(scope="module")
def golden_bundle(request: pytest.FixtureRequest) -> Path:
    path = os.environ.get("SOLAR_BOARD_BUNDLE")
    return Path(path) if path else request.getfixturevalue("tiny_bundle_master")


def test_outputs_match_the_x86_golden_within_tolerance(golden_bundle):
    rows = compare(golden_bundle)
    if rows[0][1] == "stale":  # a failure, not a skip: a skipped golden checks nothing
        pytest.fail("the exported bundle is not the one the golden outputs were written for "
                    "(exporter changed): rerun tests/board/model_golden.py --write BUNDLE on "
                    "x86-64 with the tiny GPT-2 bundle")
    assert [r[1] in ("identical", "within tolerance") for r in rows] == [True] * 3, rows


def test_the_packet_changes_the_outputs_far_beyond_the_tolerance():
    with np.load(MODEL) as ref:
        plain, patched = ref["plain"], ref["patched"]
    assert np.abs(patched - plain).max() > 100 * OUTPUT_RTOL * np.abs(plain).max()


def test_the_golden_packet_is_the_same_bytes_each_time(golden_bundle):
    assert model_packet(golden_bundle) == model_packet(golden_bundle)
