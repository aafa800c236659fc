"""Bundle reader: every file re-hashed, typed errors naming the file, arrays as promised."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from solar_edge.errors import BundleError, BundleIntegrityError
from solar_edge.format.bundle import MANIFEST, compute_fingerprint, load_bundle


def _rewrite_manifest(root, edit, reseal=True):
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    if reseal:
        manifest["fingerprint"] = compute_fingerprint(manifest).hex()
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_loads_and_exposes_layers(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.fingerprint == compute_fingerprint(b.manifest)
    assert len(b.fingerprint) == 32
    names = [layer.name for layer in b.layers]
    assert names == sorted(names) and [layer.id for layer in b.layers] == list(range(len(names)))
    for layer in b.layers:
        u, v = b.basis(layer.id)
        assert u.dtype == v.dtype == np.float32
        assert u.shape == (layer.out_features, layer.rank)
        assert v.shape == (layer.in_features, layer.rank)
        assert b.singular_values(layer.id).shape == (layer.rank,)
    assert b.tokenizer_dir is None  # a callable model has no tokenizer
    assert b.onnx_path.is_file()


def test_base_weight_is_read_only_memmap_matching_the_graph(tiny_bundle):
    b = load_bundle(tiny_bundle)
    model = onnx.load(str(b.onnx_path))  # resolves external data from weights/*.npy
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for layer in b.layers:
        w0 = b.base_weight(layer.id)
        assert isinstance(w0, np.memmap) and w0.shape == layer.shape
        with pytest.raises(ValueError):
            w0[0, 0] = 1.0
        assert np.array_equal(inits[layer.onnx_initializer], w0.T)


@pytest.mark.parametrize("victim", ["model.onnx", "weights/0003.npy", "basis/0001.U.npy",
                                    "basis/0007.V.npy"])
def test_altered_file_is_named(tiny_bundle, victim):
    path = tiny_bundle / victim
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError) as exc:
        load_bundle(tiny_bundle)
    assert exc.value.path == victim and "SHA-256" in str(exc.value)


@pytest.mark.parametrize("victim", ["model.onnx", "weights/0000.npy", "basis/0005.S.npy"])
def test_missing_file_is_named(tiny_bundle, victim):
    (tiny_bundle / victim).unlink()
    with pytest.raises(BundleIntegrityError) as exc:
        load_bundle(tiny_bundle)
    assert exc.value.path == victim and "missing" in str(exc.value)


def test_truncated_file_is_named(tiny_bundle):
    path = tiny_bundle / "basis/0002.V.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(BundleIntegrityError, match="size") as exc:
        load_bundle(tiny_bundle)
    assert exc.value.path == "basis/0002.V.npy"


def test_edited_manifest_breaks_the_fingerprint(tiny_bundle):
    _rewrite_manifest(tiny_bundle, lambda m: m["layers"][0].update(rank=1), reseal=False)
    with pytest.raises(BundleIntegrityError) as exc:
        load_bundle(tiny_bundle)
    assert exc.value.path == MANIFEST


def test_missing_manifest(tiny_bundle):
    (tiny_bundle / MANIFEST).unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize("hostile", ["../outside.npy", "/etc/passwd", "a/../../b", "a\\b", ""])
def test_paths_that_escape_the_bundle_are_refused(tiny_bundle, hostile):
    def edit(m):
        m["files"][hostile] = {"bytes": 0, "sha256": "00" * 32}

    _rewrite_manifest(tiny_bundle, edit)
    with pytest.raises(BundleError) as exc:
        load_bundle(tiny_bundle)
    assert exc.value.path == hostile


def test_referenced_file_must_be_hashed(tiny_bundle):
    def edit(m):
        del m["files"]["basis/0000.U.npy"]

    _rewrite_manifest(tiny_bundle, edit)
    with pytest.raises(BundleIntegrityError) as exc:
        load_bundle(tiny_bundle)
    assert exc.value.path == "basis/0000.U.npy"


def test_unknown_format_version(tiny_bundle):
    _rewrite_manifest(tiny_bundle, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(tiny_bundle)


def test_layer_ids_must_be_positions(tiny_bundle):
    _rewrite_manifest(tiny_bundle, lambda m: m["layers"][1].update(id=7))
    with pytest.raises(BundleError, match="positions"):
        load_bundle(tiny_bundle)


def test_reader_does_not_import_torch(tiny_bundle):
    code = ("import sys; from solar_edge.format.bundle import load_bundle; "
            f"b = load_bundle({str(tiny_bundle)!r}); b.basis(0); b.base_weight(0); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
