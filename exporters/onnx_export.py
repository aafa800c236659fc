"""ONNX graph whose adaptable weights the runtime can patch in place (see docs/export.md).

Each target module is replaced by :class:`PatchableLinear`, which computes
``x @ weight_t + bias`` with a parameter ``weight_t = W0.T`` (``in x out``). Both torch
exporters then emit one ``MatMul`` whose right operand is a plain named initializer: no
``Transpose`` node that ONNX Runtime could constant-fold into a new, unlinked tensor.
After export the initializer is renamed ``<module>.weight_t`` and checked to feed exactly
one ``MatMul`` as its right operand. Its data is then moved out of ``model.onnx`` into
``weights/NNNN.npy`` as ONNX external data: the ``.npy`` holds ``W0`` (``out x in``) in
Fortran order, whose bytes are exactly ``W0.T`` row-major, so the base weights are stored
once and serve both the graph and the runtime's memory map. The other large initializers
(embeddings) go to ``model.onnx.data``, so ``model.onnx`` and any graph variant written
beside it hold only the graph (kilobytes).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data
from torch import nn
from torch.nn import functional as F

from solar_edge.errors import ExportError
from solar_edge.format.graph import bias_name, initializer_name

from .families.base import LoadedModel
from .targets import is_conv1d, weight_out_in

OPSET = 18
EXPORTERS = ("torchscript", "dynamo")
ONNX_LAYOUT = "in_out"  # the initializer holds W.T, row-major
DATA_FILE = "model.onnx.data"  # every other initializer of 1 KiB or more


class PatchableLinear(nn.Module):
    """``y = x @ weight_t + bias`` with ``weight_t = W0.T`` as a named parameter.

    ``fully_connected=True`` switches the forward to ``linear`` on 2-D rows, which
    TFLite converters map onto ``FULLY_CONNECTED`` with an ``(out, in)`` weight.
    """

    def __init__(self, w_out_in: np.ndarray, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w_out_in.T)),
                                     requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(torch.float32).clone(), requires_grad=False)
        self.fully_connected = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fully_connected:
            rows = x.reshape(-1, x.shape[-1])
            y = F.linear(rows, self.weight_t.t(), self.bias)
            return y.reshape(*x.shape[:-1], self.weight_t.shape[1])
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def make_patchable(model: nn.Module, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Swap each named Linear/Conv1D for a :class:`PatchableLinear`; returns name -> W0."""
    weights: dict[str, np.ndarray] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        w0 = weight_out_in(old)
        bias = getattr(old, "bias", None)
        if is_conv1d(old) and bias is not None and bias.dim() != 1:
            raise ExportError(f"{name}: unexpected Conv1D bias shape {tuple(bias.shape)}")
        setattr(parent, child, PatchableLinear(w0, bias))
        weights[name] = w0
    return weights


def set_fully_connected(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, PatchableLinear):
            m.fully_connected = on


def model_type_prefix(loaded: LoadedModel) -> str:
    """``"model_type 'x': "`` for messages about a transformers model, else ``""``."""
    model_type = loaded.identity.get("model_type")
    return f"model_type {model_type!r}: " if model_type else ""


def torch_export(loaded: LoadedModel, path: Path, exporter: str = "torchscript") -> None:
    """Trace ``loaded`` to ONNX at ``path`` (weights inline) with dynamic batch/seq axes."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    wrapper = loaded.wrapper()
    args = tuple(loaded.example_inputs.values())
    axes = loaded.dynamic_axes()
    quiet_torch = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed"
    level = quiet_torch.level
    quiet_torch.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                dyn = torch.export.Dim.DYNAMIC
                # forward(*args): the whole positional tuple is one (variadic) argument
                shapes = (tuple({ax: dyn for ax in axes[n]} for n in loaded.input_names),)
                torch.onnx.export(
                    wrapper, args, str(path), input_names=loaded.input_names,
                    output_names=loaded.output_names, dynamic_shapes=shapes,
                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                )
            else:
                torch.onnx.export(
                    wrapper, args, str(path), input_names=loaded.input_names,
                    output_names=loaded.output_names, dynamic_axes=axes,
                    opset_version=OPSET, dynamo=False,
                )
        except Exception as exc:  # exporters raise many unrelated types
            raise ExportError(f"{model_type_prefix(loaded)}torch.onnx.export ({exporter}) failed: "
                              f"{exception_summary(exc)}") from exc
        finally:
            quiet_torch.setLevel(level)


def exception_summary(exc: BaseException, limit: int = 300) -> str:
    """One line of an exporter's multi-page message: its "Exception summary" line where it
    has one (torch.export's), else its first non-empty line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    pick = lines[0]
    for i, line in enumerate(lines[:-1]):
        if line.lstrip("# ").lower() == "exception summary":
            pick = lines[i + 1]
            break
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


def consumers(graph: onnx.GraphProto, name: str) -> list[tuple[onnx.NodeProto, int]]:
    return [(n, i) for n in graph.node for i, x in enumerate(n.input) if x == name]


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
    for vi in graph.input:
        if vi.name == old:
            vi.name = new


def link_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                 prefix: str = "model.") -> dict[str, str]:
    """Rename each weight's initializer to ``<module>.weight_t`` and check it is patchable.

    The initializer is found by its traced name (``prefix + module + '.weight_t'``), or
    else by exact value ``W0.T``. Raises :class:`ExportError` if it is missing, shared,
    or not the right operand of exactly one ``MatMul``.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    result: dict[str, str] = {}
    for module, w0 in weights.items():
        init = inits.get(prefix + initializer_name(module))
        if init is None:
            wt = np.ascontiguousarray(w0.T)
            hits = [i for i in graph.initializer if tuple(i.dims) == wt.shape
                    and np.array_equal(numpy_helper.to_array(i), wt)]
            if len(hits) != 1:
                raise ExportError(f"{module}: {len(hits)} initializers hold W0.T after export")
            init = hits[0]
        new = initializer_name(module)
        old = init.name
        init.name = new
        _rename(graph, old, new)
        uses = consumers(graph, new)
        if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 1:
            ops = [(n.op_type, i) for n, i in uses]
            raise ExportError(f"{new}: feeds {ops}, not exactly one MatMul as right operand; "
                              "the runtime could not patch it in place")
        result[module] = new
    return result


def _through_identity(producers: dict[str, onnx.NodeProto], name: str) -> str:
    """The tensor ``name`` is an ``Identity`` of (the exporter's way of sharing one
    initializer between equal constants), followed to its source; else ``name``.
    ``producers``: each tensor's producing node."""
    seen = set()
    while name in producers and producers[name].op_type == "Identity" and name not in seen:
        seen.add(name)
        name = producers[name].input[0]
    return name


def link_biases(model: onnx.ModelProto, weight_inits: dict[str, str],
                biases: dict[str, np.ndarray]) -> dict[str, str]:
    """Rename each layer's bias initializer to ``<module>.bias`` where the graph adds it right
    after the weight's ``MatMul`` (found by structure, checked by value). A bias initializer
    the exporter shares between nodes (it merges equal constants, directly or through
    ``Identity`` nodes: every all-zero bias of a freshly initialised model becomes one) is
    copied for this layer's ``Add`` alone. Layers whose bias is not such an initializer are
    left out (their bias cannot be patched)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}  # copies add no nodes
    result: dict[str, str] = {}
    for module, b0 in biases.items():
        matmul = consumers(graph, weight_inits[module])[0][0]
        uses = consumers(graph, matmul.output[0])
        if len(uses) != 1 or uses[0][0].op_type != "Add":
            continue
        add, slot = uses[0][0], 1 - uses[0][1]
        other = add.input[slot]
        init = inits.get(_through_identity(producers, other))
        if init is None or tuple(init.dims) != b0.shape or \
                not np.array_equal(numpy_helper.to_array(init), b0.astype(np.float32)):
            continue
        new = bias_name(module)
        if init.name == other and len(consumers(graph, other)) == 1:
            init.name = new
            _rename(graph, other, new)
        else:
            graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(init).copy(), new))
            add.input[slot] = new
        result[module] = new
    return result


def npy_data_offset(path: Path) -> int:
    """Byte offset of the array data in a ``.npy`` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


def write_base_weight(w0: np.ndarray, path: Path) -> int:
    """Write ``W0`` (``out x in``) float32 in Fortran order; returns the data offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asfortranarray(w0, dtype=np.float32), allow_pickle=False)
    return npy_data_offset(path)


def bias_file(weight_file: str) -> str:
    """``weights/NNNN.npy`` -> ``weights/NNNN.bias.npy``."""
    return weight_file.removesuffix(".npy") + ".bias.npy"


def externalize(model: onnx.ModelProto, init_name: str, rel_path: str, offset: int,
                nbytes: int) -> None:
    """Point initializer ``init_name`` at ``rel_path[offset:offset+nbytes]``."""
    init = next(i for i in model.graph.initializer if i.name == init_name)
    if init.data_type != onnx.TensorProto.FLOAT:
        raise ExportError(f"{init_name}: only float32 weights are supported")
    if not init.HasField("raw_data"):
        init.raw_data = numpy_helper.to_array(init).astype("<f4").tobytes()
        init.ClearField("float_data")
    set_external_data(init, location=rel_path, offset=offset, length=nbytes)
    init.data_location = onnx.TensorProto.EXTERNAL
    init.ClearField("raw_data")


def export_onnx(
    loaded: LoadedModel,
    weights: dict[str, np.ndarray],
    layer_files: dict[str, str],
    out_dir: Path,
    exporter: str = "torchscript",
    on_step: Callable[[str], None] | None = None,
    biases: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Export ``model.onnx`` into ``out_dir`` with each weight external in its ``.npy``.

    ``weights``: module -> W0 (after :func:`make_patchable`); ``layer_files``: module ->
    relative path of its base-weight file; ``biases``: module -> b0 of the layers that have
    one, each written to :func:`bias_file` as the bias initializer's external data.
    Returns (module -> weight initializer, module -> bias initializer).
    """
    raw_path = out_dir / "model.raw.onnx"
    torch_export(loaded, raw_path, exporter)
    if on_step:
        on_step("traced")
    model = onnx.load(str(raw_path))
    raw_path.unlink()
    if not any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in model.opset_import):
        raise ExportError("exported graph has no default-domain opset >= 17")
    names = link_weights(model, weights)
    bias_names = link_biases(model, names, biases or {})
    for module, w0 in weights.items():
        rel = layer_files[module]
        offset = write_base_weight(w0, out_dir / rel)
        externalize(model, names[module], rel, offset, w0.size * 4)
        if module in bias_names:
            b0 = np.asarray((biases or {})[module], np.float32)
            np.save(out_dir / bias_file(rel), b0, allow_pickle=False)
            externalize(model, bias_names[module], bias_file(rel),
                        npy_data_offset(out_dir / bias_file(rel)), b0.size * 4)
    onnx.save(model, str(out_dir / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    return names, bias_names
