"""Fixtures: bundles exported from real MiniLM weights (and a tiny model for reader tests).

``minilm_bundle`` (session scope) -> ``pathlib.Path`` of a verified bundle directory:
the real all-MiniLM-L6-v2 exported for the ``x86-64`` profile (float32, full-rank bases
R = 384, ONNX Runtime backend, no TFLite), all 36 encoder Linear layers adaptable, with
``tokenizer/``. Open it with ``solar_edge.format.bundle.load_bundle(path)``. It is shared by
every test of the session: do not modify it; copy it (``shutil.copytree``) first.
About 30 s on two cores (model load, 36 SVDs, TorchScript ONNX export).

``minilm_variants_bundle`` (session scope) -> ``Path`` of a copy of ``minilm_bundle`` with the
graph variants every patching mechanism needs (``graph_variants.add_variants_to_bundle``);
read-only like ``minilm_bundle``.

``tiny_bundle`` (function scope) -> ``Path`` of a fresh private copy of a bundle exported
from the 2-layer GPT-2 of :mod:`solar_edge.exporters.examples` (8 layers, kilobytes):
tests may alter or delete its files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["minilm_bundle", "minilm_variants_bundle", "tiny_bundle", "tiny_bundle_master"]

TINY_GPT2 = "solar_edge.exporters.examples:tiny_gpt2"


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from solar_edge.exporters.pipeline import export_bundle

    out = tmp_path_factory.mktemp("minilm") / "bundle"
    export_bundle(None, "x86-64", out)
    return out


@pytest.fixture(scope="session")
def minilm_variants_bundle(tmp_path_factory: pytest.TempPathFactory,
                           minilm_bundle: Path) -> Path:
    from solar_edge.exporters import graph_variants

    out = tmp_path_factory.mktemp("minilm-variants") / "bundle"
    shutil.copytree(minilm_bundle, out)
    graph_variants.add_variants_to_bundle(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_bundle_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from solar_edge.exporters.pipeline import export_bundle

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    export_bundle(TINY_GPT2, "x86-64", out)
    return out


@pytest.fixture
def tiny_bundle(tiny_bundle_master: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_master, dest)
    return dest
