"""``export --backend``: the profile's backend overridden, and a missing TFLite converter
refused before any work (no model load, no torch import, nothing written)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from solar_edge.errors import ExportError
from solar_edge.exporters.backend_choice import resolve_backend, tflite_converter_available
from solar_edge.profiles.device import load_profile

needs_no_converter = pytest.mark.skipif(tflite_converter_available(),
                                        reason="litert-torch is installed here")


def test_backend_onnx_overrides_a_tflite_profile():
    rpi4 = load_profile("rpi4")
    assert rpi4.backend == "tflite"
    chosen = resolve_backend(rpi4, "onnx")
    assert chosen.backend == "onnxruntime"
    assert (chosen.basis_dtype, chosen.basis_budget_mb, chosen.max_rank) == ("float16", 16, 256)
    assert resolve_backend(load_profile("x86-64"), None).backend == "onnxruntime"


def test_an_unknown_backend_is_an_export_error():
    with pytest.raises(ExportError, match="backend must be one of"):
        resolve_backend(load_profile("x86-64"), "coreml")


@needs_no_converter
@pytest.mark.parametrize(("device", "choice", "origin"), [
    ("rpi4", None, "profile 'rpi4' defaults to tflite"),
    ("x86-64", "tflite", "--backend tflite"),
])
def test_missing_converter_is_refused_with_the_install_hint(device, choice, origin):
    with pytest.raises(ExportError) as err:
        resolve_backend(load_profile(device), choice)
    message = str(err.value)
    assert origin in message and "pip install 'solar-edge[convert]'" in message
    assert "--backend onnx" in message


@needs_no_converter
def test_cli_refuses_at_once_without_importing_torch(tmp_path):
    out = tmp_path / "bundle"
    code = ("import sys\n"
            "from solar_edge.cli import main\n"
            f"sys.argv = ['solar-edge', 'export', '--device', 'rpi4', '--out', {str(out)!r}]\n"
            "try:\n    main()\n"
            "except SystemExit as e:\n"
            "    print('torch' in sys.modules, e.code)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ExportError: profile 'rpi4' defaults to tflite")
    assert "--backend onnx" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and elapsed < 30


@needs_no_converter
def test_export_bundle_refuses_before_loading_the_model(tmp_path):
    from solar_edge.exporters.pipeline import export_bundle

    start = time.monotonic()
    with pytest.raises(ExportError, match="--backend onnx"):
        export_bundle("no/such/model", "rpi4", tmp_path / "b")   # never loaded
    assert time.monotonic() - start < 1.0 and not (tmp_path / "b").exists()
