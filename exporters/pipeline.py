"""The export stage end to end: model + device profile -> verified bundle directory.

Steps: load the model, pick target modules, size ranks from the profile, float64 SVD per
layer, patchable ONNX graph with external base weights, check ONNX Runtime against torch,
TFLite for TFLite profiles, tokenizer, manifest. The bundle is built in a sibling
temporary directory and moved into place only when complete, then re-read with
:func:`solar_edge.format.bundle.load_bundle` as a final check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from solar_edge.errors import ExportError
from solar_edge.format.bundle import Bundle, load_bundle
from solar_edge.profiles.device import DeviceProfile, choose_ranks, load_profile

from . import basis as basis_mod
from . import manifest as manifest_mod
from . import onnx_export, tflite_export
from .backend_choice import resolve_backend
from .families import LoadedModel, load_model
from .families.base import first_tensor
from .families.text_encoder import copy_tokenizer
from .progress import Progress
from .targets import select_targets, weight_out_in

ORT_TOLERANCE = 1e-3  # sanity bound at export time; tests hold MiniLM to 1e-4


@dataclass
class ExportResult:
    bundle: Bundle
    seconds: dict[str, float] = field(default_factory=dict)
    max_abs_diff_onnx: float = float("nan")


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (--force replaces it)")
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _onnx_vs_torch(loaded: LoadedModel, onnx_path: Path) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}
    unused = [n for n in loaded.example_inputs if n not in graph_inputs]
    if unused:  # the tracer drops inputs the model ignores (Bloom's ALiBi: position_ids)
        raise ExportError(f"{onnx_export.model_type_prefix(loaded)}the exported graph has no input "
                          f"{', '.join(unused)}, which the board feeds: this architecture "
                          "is not supported")
    feeds = {k: v.numpy() for k, v in loaded.example_inputs.items()}
    try:
        got = session.run(None, feeds)[0]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ExportError(f"{onnx_export.model_type_prefix(loaded)}the exported graph does not "
                          f"run in ONNX Runtime: {onnx_export.exception_summary(exc)}") from exc
    with torch.no_grad():
        want = first_tensor(loaded.wrapper()(*loaded.example_inputs.values())).numpy()
    if got.shape != want.shape:
        raise ExportError(f"ONNX output shape {got.shape} != torch {want.shape}")
    return float(np.abs(got - want).max())


def _one_blas_thread() -> Any:
    """Per-layer SVDs are small: one BLAS thread avoids oversubscription on shared cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up only
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _write_basis(work: Path, names: Sequence[str], weights: dict[str, np.ndarray],
                 ranks: Sequence[int], profile: DeviceProfile, progress: Progress) -> None:
    with _one_blas_thread():
        _write_basis_loop(work, names, weights, ranks, profile, progress)


def _write_basis_loop(work: Path, names: Sequence[str], weights: dict[str, np.ndarray],
                      ranks: Sequence[int], profile: DeviceProfile, progress: Progress) -> None:
    for layer_id in progress.iterate(range(len(names)), len(names), "SVD (float64)"):
        files = manifest_mod.layer_file_names(layer_id)
        svd = basis_mod.svd_basis(weights[names[layer_id]], ranks[layer_id])
        u, v, s = basis_mod.stored(svd, profile.basis_dtype)
        (work / "basis").mkdir(exist_ok=True)
        np.save(work / files["U"], u, allow_pickle=False)
        np.save(work / files["V"], v, allow_pickle=False)
        np.save(work / files["S"], s, allow_pickle=False)


def _tflite(loaded: LoadedModel, work: Path, names: Sequence[str],
            layers: dict[str, tuple[np.ndarray, np.ndarray | None]],
            profile: DeviceProfile, progress: Progress) -> tuple[dict[str, Any], list[Any]]:
    path = work / "model.tflite"
    with progress.step("TFLite conversion"):
        tflite_export.convert(loaded, profile.tflite_seq_len, path)
    norms = tflite_export.preceding_layernorms(loaded, list(names))
    placements = tflite_export.locate_weights(path.read_bytes(), layers, norms)
    per_layer = []
    (work / "tflite").mkdir(exist_ok=True)
    for layer_id, name in enumerate(names):
        rec = placements[name]
        for key, suffix in (("input_scale", "scale"), ("input_shift", "shift")):
            if rec[key] is not None:
                rel = f"tflite/{layer_id:04d}.{suffix}.npy"
                np.save(work / rel, rec[key], allow_pickle=False)
                rec[key] = rel
        per_layer.append(rec)
    section = {"file": "model.tflite", "seq_len": profile.tflite_seq_len,
               **tflite_export.io_details(path, loaded.input_names)}
    return section, per_layer


def export_bundle(
    model: str | None,
    profile: str | DeviceProfile,
    out_dir: str | Path,
    target_modules: str | Sequence[str] | None = None,
    exporter: str = "torchscript",
    overwrite: bool = False,
    progress: Progress | None = None,
    graph_variants: Sequence[str] | None = None,
    backend: str | None = None,
) -> ExportResult:
    """Export ``model`` (spec as in :func:`~.models.load_model`) for ``profile`` to ``out_dir``.

    ``graph_variants``: extra ONNX graphs for runtime patching mechanisms
    (:mod:`.graph_variants`); ``None`` takes the profile's ``graph_variants`` list.
    ``backend``: ``onnx`` or ``tflite`` overrides the profile's backend; checked (with the
    TFLite converter's presence) before the model is loaded.
    """
    progress = progress or Progress(enabled=False)
    prof = resolve_backend(load_profile(profile) if isinstance(profile, str) else profile,
                           backend)
    out = Path(out_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with progress.step("loading model"):
        loaded = load_model(model)
    if prof.backend == "tflite" and not loaded.supports_tflite:
        raise ExportError(f"a {loaded.identity.get('family')} model has no TFLite export; "
                          "use an onnxruntime profile")
    names = select_targets(loaded.model, target_modules)
    modules = dict(loaded.model.named_modules())
    weights = {n: weight_out_in(modules[n]) for n in names}
    biases = {n: (None if getattr(modules[n], "bias", None) is None
                  else modules[n].bias.detach().float().numpy().copy()) for n in names}
    shapes = [weights[n].shape for n in names]
    ranks = choose_ranks(shapes, prof)
    seconds["load"] = time.perf_counter() - t0

    work = _prepare_out(out, overwrite)
    try:
        t = time.perf_counter()
        _write_basis(work, names, weights, ranks, prof, progress)
        seconds["svd"] = time.perf_counter() - t

        t = time.perf_counter()
        onnx_export.make_patchable(loaded.model, names)
        files = {n: manifest_mod.layer_file_names(i)["weight"] for i, n in enumerate(names)}
        with progress.step(f"ONNX export ({exporter}, opset {onnx_export.OPSET})"):
            inits, bias_inits = onnx_export.export_onnx(
                loaded, weights, files, work, exporter,
                biases={n: b for n, b in biases.items() if b is not None})
        diff = _onnx_vs_torch(loaded, work / "model.onnx")
        if not diff <= ORT_TOLERANCE:
            raise ExportError(f"ONNX Runtime output differs from torch by {diff:.3g}")
        seconds["onnx"] = time.perf_counter() - t

        tflite_section, tflite_layers = None, [None] * len(names)
        if prof.backend == "tflite":
            t = time.perf_counter()
            layers = {n: (weights[n], biases[n]) for n in names}
            tflite_section, tflite_layers = _tflite(loaded, work, names, layers, prof, progress)
            seconds["tflite"] = time.perf_counter() - t

        if loaded.tokenizer_files:
            copy_tokenizer(loaded.tokenizer_files, work / "tokenizer")
        head_parts = manifest_mod.write_head_parts(work, loaded.head_parts)
        body = {
            "model": loaded.identity,
            "profile": prof.to_dict(),
            "target_modules": target_modules if target_modules is None
            or isinstance(target_modules, str) else list(target_modules),
            "onnx": {"file": "model.onnx", "opset": onnx_export.OPSET, "exporter": exporter,
                     "data": onnx_export.DATA_FILE
                     if (work / onnx_export.DATA_FILE).is_file() else None,
                     "weight_layout": onnx_export.ONNX_LAYOUT,
                     **manifest_mod.onnx_io(work / "model.onnx")},
            "tflite": tflite_section,
            "tokenizer": "tokenizer" if loaded.tokenizer_files else None,
            "head_parts": head_parts,
            "canary": {"inputs": loaded.canary_inputs} if loaded.canary_inputs else None,
            "layers": [
                {"id": i, "name": n, "shape": list(weights[n].shape), "rank": ranks[i],
                 "basis_dtype": prof.basis_dtype, "has_bias": biases[n] is not None,
                 "onnx": {"initializer": inits[n], "layout": onnx_export.ONNX_LAYOUT,
                          "bias": bias_inits.get(n)},
                 "files": manifest_mod.layer_file_names(i, n in bias_inits),
                 "tflite": tflite_layers[i]}
                for i, n in enumerate(names)
            ],
        }
        t = time.perf_counter()
        with progress.step("hashing files"):
            manifest = manifest_mod.finalize(body, work)
            manifest_mod.write_manifest(work, manifest)
        variants = list(prof.extra.get("graph_variants", []) if graph_variants is None
                        else graph_variants)
        if variants:
            from .graph_variants import add_variants_to_bundle

            with progress.step(f"graph variants {variants}"):
                add_variants_to_bundle(str(work), variants)
        seconds["manifest"] = time.perf_counter() - t
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    seconds["total"] = time.perf_counter() - t0
    return ExportResult(load_bundle(out), seconds, diff)
