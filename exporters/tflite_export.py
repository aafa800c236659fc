"""TFLite graph for TFLite profiles (optional ``convert`` extra: ``litert-torch``).

The runtime patches TFLite weights by rewriting their bytes in a ``bytearray`` of the
flatbuffer and re-creating the interpreter (docs/runtime.md), so for every adaptable weight the
manifest records where its bytes are. The converter is free to fold neighbouring affine
ops into a ``FULLY_CONNECTED`` weight: it may fold a preceding LayerNorm's ``gamma`` and
``beta`` into ``W * gamma`` (per input column) and ``b + W @ beta`` (seen on MiniLM and the
project's ViT), and it moves attention's ``d**-0.25`` into query and key (``c * W``,
``c * b``), with or without the LayerNorm fold (a tiny ViT whose linear biases were 0 kept
its LayerNorms as their own ops). :func:`locate_weights` finds each weight by value, recovers that
affine map from the stored tensors, and records

* ``weight``: tensor index, buffer index, file ``offset``/``nbytes``, ``shape`` (out, in),
  ``layout`` ``"out_in"`` float32 row-major;
* ``bias``: the same for the bias tensor (or ``None``);
* ``input_scale`` / ``input_shift``: ``.npy`` files of ``c * gamma`` / ``c * beta`` (or
  ``None``); ``output_scale``: ``c`` (``None`` when nothing was folded).

Patch rule for an update ``dW`` (and a bias delta ``db``): ``W_tfl = W_tfl0 + dW *
input_scale[None, :]`` and ``b_tfl = b_tfl0 + dW @ input_shift + output_scale * db`` (terms
dropped where ``None``); DoRA: :func:`solar_edge.runtime.backends.tflite.patch_flatbuffer`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from solar_edge.errors import ExportError

from .backend_choice import tflite_converter_available
from .families.base import LoadedModel
from .onnx_export import set_fully_connected

REL_TOL = 1e-6  # exactness of a recovered fold, relative to the weight's magnitude


def static_inputs(loaded: LoadedModel, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Batch-1 sample inputs, token inputs padded/truncated to ``seq_len`` (TFLite is static)."""
    out = []
    for t in loaded.example_inputs.values():
        row = t[:1]
        if not t.is_floating_point() and t.dim() >= 2:
            n = row.shape[1]
            if n >= seq_len:
                row = row[:, :seq_len]
            else:
                pad = torch.zeros((1, seq_len - n, *row.shape[2:]), dtype=row.dtype)
                row = torch.cat([row, pad], dim=1)
        out.append(row.contiguous())
    return tuple(out)


def convert(loaded: LoadedModel, seq_len: int, path: Path) -> None:
    """Convert the (patchable) model to ``path`` with static batch 1 and ``seq_len``."""
    if not tflite_converter_available():
        raise ExportError(
            "this profile's backend is tflite but the TFLite converter is not installed: "
            "pip install 'solar-edge[convert]' (litert-torch)"
        )
    wrapper = loaded.wrapper()
    set_fully_connected(wrapper, True)
    log = path.with_suffix(".log")
    try:
        with _captured_output(log), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            import litert_torch  # inside: its import logs through absl to the native stderr

            edge = litert_torch.convert(wrapper, static_inputs(loaded, seq_len))
            edge.export(str(path))
    except Exception as exc:  # the converter raises many unrelated types
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise ExportError(f"TFLite conversion failed: {exc}\n{tail}") from exc
    finally:
        set_fully_connected(wrapper, False)
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def _captured_output(log: Path) -> Iterator[None]:
    """Send the converter's chatter (Python and native, stdout and stderr) to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# --- finding the weights in the flatbuffer ------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    index: int
    buffer: int
    offset: int
    shape: tuple[int, ...]
    array: np.ndarray  # float32 view of the file bytes

    def record(self, layout: str | None = None) -> dict[str, Any]:
        rec = {"tensor": self.index, "buffer": self.buffer, "offset": self.offset,
               "nbytes": int(self.array.nbytes), "shape": list(self.shape), "dtype": "float32"}
        if layout:
            rec["layout"] = layout
        return rec


def _fully_connected(data: bytes) -> list[tuple[_Tensor, _Tensor | None]]:
    """(weight, bias) tensors of every FULLY_CONNECTED op with constant float32 weights."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    if model.SubgraphsLength() < 1:
        raise ExportError("TFLite model has no subgraph")
    graph = model.Subgraphs(0)

    def tensor(index: int) -> _Tensor | None:
        if index < 0:
            return None
        t = graph.Tensors(index)
        if t.Type() != schema.TensorType.FLOAT32:
            return None
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        buf = model.Buffers(t.Buffer())
        count = int(np.prod(shape)) if shape else 1
        if buf.DataLength():
            offset = buf._tab.Vector(buf._tab.Offset(4))
        elif buf.Offset() > 1:
            offset = int(buf.Offset())
        else:
            return None  # not a constant
        arr = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape)
        return _Tensor(index, int(t.Buffer()), int(offset), shape, arr)

    fc = schema.BuiltinOperator.FULLY_CONNECTED
    result = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != fc:
            continue
        ins = [int(x) for x in op.InputsAsNumpy()]
        w = tensor(ins[1]) if len(ins) > 1 else None
        if w is not None and len(w.shape) == 2:
            result.append((w, tensor(ins[2]) if len(ins) > 2 else None))
    return result


def column_scale(stored: np.ndarray, w0: np.ndarray) -> np.ndarray | None:
    """``s`` with ``stored == w0 * s[None, :]`` to float round-off, or ``None`` if none exists."""
    w = w0.astype(np.float64)
    st = stored.astype(np.float64)
    norms = (w * w).sum(axis=0)
    if np.any(norms == 0):
        return None
    s = (st * w).sum(axis=0) / norms
    err = np.abs(w * s[None, :] - st).max()
    return s if err <= REL_TOL * max(np.abs(st).max(), 1e-30) else None


def preceding_layernorms(loaded: LoadedModel,
                         names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> ``(gamma, beta)`` of the ``nn.LayerNorm`` whose output is its input.

    Found by running the example inputs with hooks: a LayerNorm output and a target's
    input are the same tensor storage (eval-mode dropout in between passes it through).
    """
    from torch import nn

    outputs: list[tuple[torch.Tensor, nn.LayerNorm]] = []
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(loaded.model.named_modules())
    for m in modules.values():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            handles.append(m.register_forward_hook(
                lambda mod, _i, out: outputs.append((out, mod))))
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(
            lambda mod, args, name=name: inputs.__setitem__(name, args[0])))
    try:
        with torch.no_grad():
            loaded.wrapper()(*loaded.example_inputs.values())
    finally:
        for h in handles:
            h.remove()
    found = {}
    for name, x in inputs.items():
        for out, ln in outputs:
            if out.data_ptr() == x.data_ptr() and out.shape == x.shape \
                    and out.stride() == x.stride():
                found[name] = (ln.weight.detach().double().numpy(),
                               ln.bias.detach().double().numpy() if ln.bias is not None
                               else np.zeros(ln.weight.shape[0]))
                break
    return found


def _common_ratio(scale: np.ndarray, gamma: np.ndarray) -> float | None:
    """One scalar ``c`` with ``scale == c * gamma`` (where ``gamma`` is not ~0), or ``None``."""
    usable = np.abs(gamma) > 1e-12
    ratios = scale[usable] / gamma[usable]
    if not ratios.size:
        return 1.0
    c = float(np.median(ratios))
    return c if np.abs(ratios - c).max() <= 1e-5 * abs(c) else None


def undo_fold(module: str, scale: np.ndarray, stored_b: np.ndarray | None, w0: np.ndarray,
              b0: np.ndarray | None, ln: tuple[np.ndarray, np.ndarray] | None
              ) -> tuple[np.ndarray | None, float]:
    """Explain a column-scaled weight as ``c * (LayerNorm affine then W0)``, else (the
    converter left the LayerNorm as its own op) as ``c * W0``; returns ``(shift, c)``.

    ``c`` is a scalar converters move into a layer (attention's ``d**-0.25`` into query and
    key); folded, ``scale = c * gamma``, the bias must be ``c * (b0 + W0 @ beta)`` and the
    patch shift is ``c * beta``; unfolded, ``scale = c`` and the bias ``c * b0``. Raises
    :class:`ExportError` when neither explains the stored tensors.
    """
    n = w0.shape[1]
    hypotheses = ([ln] if ln is not None else []) + [(np.ones(n), np.zeros(n))]
    bias0 = np.zeros(w0.shape[0]) if b0 is None else b0.astype(np.float64)
    got = np.zeros(w0.shape[0]) if stored_b is None else stored_b.astype(np.float64)
    scalar = False
    for gamma, beta in hypotheses:
        c = _common_ratio(scale, gamma)
        if c is None:
            continue
        scalar = True
        expected = c * (bias0 + w0.astype(np.float64) @ beta)
        if np.abs(got - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1.0):
            shift = c * beta
            return (None if not np.any(shift) else shift), c
    if scalar:
        raise ExportError(f"{module}: TFLite bias is not the folded LayerNorm bias")
    raise ExportError(f"{module}: TFLite weight is scaled per input column in a way "
                      "no preceding LayerNorm explains; TFLite patching impossible")


def locate_weights(
    data: bytes,
    layers: dict[str, tuple[np.ndarray, np.ndarray | None]],
    layernorms: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, dict[str, Any]]:
    """module -> placement record (see module doc), for ``layers`` module -> (W0, bias0).

    ``layernorms``: module -> ``(gamma, beta)`` of the LayerNorm feeding it (see
    :func:`preceding_layernorms`). Scale and shift come back under
    ``"input_scale"``/``"input_shift"`` as float32 arrays (the caller writes them to
    files). Raises :class:`ExportError` if a weight cannot be found or its folded form
    cannot be explained.
    """
    layernorms = layernorms or {}
    fcs = _fully_connected(data)
    used: set[int] = set()
    found: dict[str, dict[str, Any]] = {}
    for module, (w0, b0) in layers.items():
        hit: tuple[_Tensor, _Tensor | None, np.ndarray | None] | None = None
        for w, b in fcs:
            if w.index in used or w.shape != w0.shape:
                continue
            if np.array_equal(w.array[0, :16], w0[0, :16]) and np.array_equal(w.array, w0):
                hit = (w, b, None)
                break
            probe = column_scale(w.array[:4], w0[:4])
            if probe is not None:
                scale = column_scale(w.array, w0)
                if scale is not None:
                    hit = (w, b, scale)
                    break
        if hit is None:
            raise ExportError(f"{module}: its weight is not a FULLY_CONNECTED tensor in the "
                              "TFLite graph (fused or quantised); TFLite patching impossible")
        w, b, scale = hit
        used.add(w.index)
        stored_b = None if b is None else b.array
        if scale is None:
            bias0 = np.zeros(w0.shape[0]) if b0 is None else b0
            if stored_b is not None and not np.array_equal(stored_b, bias0.astype(np.float32)):
                raise ExportError(f"{module}: TFLite bias differs from the model's bias")
            shift, out_scale = None, 1.0
        else:
            shift, out_scale = undo_fold(module, scale, stored_b, w0, b0, layernorms.get(module))
        found[module] = {
            "weight": w.record("out_in"),
            "bias": None if b is None else b.record(),
            "input_scale": None if scale is None else scale.astype(np.float32),
            "input_shift": None if shift is None else shift.astype(np.float32),
            "output_scale": None if abs(out_scale - 1.0) <= 1e-6 else out_scale,
        }
    return found


def io_details(path: Path, input_names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, static shapes and dtypes, read with the LiteRT interpreter.

    Each input also names the ONNX/torch input it stands for (``graph_input``): the
    converter calls positional inputs ``..._args_<i>``.
    """
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))

    def rows(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": d["name"], "shape": [int(x) for x in d["shape"]],
                 "dtype": np.dtype(d["dtype"]).name} for d in details]

    inputs = rows(interp.get_input_details())
    for position, row in enumerate(inputs):
        match = re.search(r"args_(\d+)$", row["name"])
        index = int(match.group(1)) if match else position
        if not 0 <= index < len(input_names):
            raise ExportError(f"TFLite input {row['name']!r} does not map to a graph input")
        row["graph_input"] = input_names[index]
    return {"inputs": inputs, "outputs": rows(interp.get_output_details())}
