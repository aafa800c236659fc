"""Layering held by tests, not by convention.

* The import graph (function-local imports included): the core (everything in ``solar_edge/``)
  imports none of the outer packages (exporters, runtime, devices) and no torch-side library;
  the wire formats import only the core's errors and each other; the runtime imports neither
  the delivery side, the export stage nor torch; the delivery side not the export stage, and
  the export stage not the delivery side (it may run the runtime to measure packets).
* The board path run for real with torch, transformers, peft, onnx, onnxscript, safetensors
  and ``solar_edge.exporters`` made unimportable: apply, switch, infer, classify, and an agent
  install over HTTP on loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from import_graph import graph, imports_of, violations

TORCH_SIDE = ("torch", "transformers", "peft", "onnx", "onnxscript", "litert_torch")
OUTER = ("solar_edge.exporters", "solar_edge.runtime", "solar_edge.devices")
CORE_DIRS = ("solar_edge.cli", "solar_edge.decode", "solar_edge.encode", "solar_edge.errors",
             "solar_edge.format", "solar_edge.methods", "solar_edge.profiles",
             "solar_edge.regen")
BOARD_BLOCKED = (*TORCH_SIDE, "safetensors", "solar_edge.exporters")


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return graph()


def test_the_checker_sees_function_local_and_relative_imports():
    source = textwrap.dedent("""
        import numpy
        from . import sibling
        from ..format import packet

        def later():
            import torch
            from solar_edge.devices.agent import Agent
            importlib.import_module("solar_edge.exporters.refit")
        """)
    found = imports_of(source, "solar_edge.runtime.engine")
    assert {"numpy", "torch", "solar_edge.devices.agent", "solar_edge.exporters.refit",
            "solar_edge.runtime.sibling", "solar_edge.format.packet"} <= found
    fake = {"solar_edge.format.reader": {"torch.nn"}, "solar_edge.runtime.x": {"numpy"}}
    assert violations(fake, "solar_edge", TORCH_SIDE) == ["solar_edge.format.reader -> torch.nn"]


def test_the_graph_covers_every_package(edges):
    roots = {name.split(".")[1] if name.count(".") else name for name in edges}
    assert {"exporters", "runtime", "devices", "format", "methods", "encode"} <= roots
    assert len(edges) > 60


def test_core_imports_no_outer_package_and_no_torch(edges):
    core = [m for m in edges if not m.startswith(OUTER)]
    assert all(m == "solar_edge" or m.startswith(CORE_DIRS) for m in core), core
    assert violations(edges, "solar_edge", OUTER + TORCH_SIDE, exempt=OUTER) == []


def test_wire_formats_import_only_the_core_errors_and_themselves(edges):
    allowed = ("solar_edge.format", "solar_edge.errors")
    bad = sorted(f"{mod} -> {imp}" for mod, imps in edges.items()
                 if mod.startswith("solar_edge.format")
                 for imp in imps if imp.startswith("solar_edge") and not imp.startswith(allowed))
    assert bad == []


def test_runtime_imports_neither_delivery_nor_export_nor_torch(edges):
    forbidden = ("solar_edge.devices", "solar_edge.exporters", *TORCH_SIDE, "safetensors")
    assert violations(edges, "solar_edge.runtime", forbidden) == []


def test_delivery_and_export_stay_apart(edges):
    """The export stage may run the board runtime (to measure packets as served) but never
    the delivery side; delivery never the export stage."""
    assert violations(edges, "solar_edge.devices", ("solar_edge.exporters", *TORCH_SIDE)) == []
    assert violations(edges, "solar_edge.exporters", ("solar_edge.devices",)) == []


# --- the board path, executed with the server-side libraries blocked ------------------------

BOARD = r"""
import json, sys
from pathlib import Path

BLOCKED = tuple(sys.argv[1].split(","))

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is not installed on this board (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocked())

from solar_edge.devices.agent import Agent, AgentConfig, RetryPolicy
from solar_edge.devices.applier import RuntimeApplier
from solar_edge.devices.fetcher import HttpTransport
from solar_edge.devices.server import RepoServer
from solar_edge.format import signing
from solar_edge.runtime.engine import EdgeRuntime

work = Path(sys.argv[2])
args = json.loads((work / "args.json").read_text())
key = signing.load_public_key(work / "k.pub")
texts = ["Open a file and return a stream.", "Return the absolute value."]

rt = EdgeRuntime(args["bundle"], [key], mechanism=args["mechanism"])
rt.apply((work / "a.slr").read_bytes())
a_out = rt.infer(texts)
rt.apply((work / "b.slr").read_bytes())
labels = rt.classify(texts)
rt.switch("a")
again = rt.infer(texts)

server = RepoServer(work / "repo").start()
try:
    applier = RuntimeApplier(lambda: EdgeRuntime(args["bundle"], [key]))
    config = AgentConfig(server.url, work / "device",
                         trusted_root=(work / "repo" / "metadata" / "1.root.json").read_bytes(),
                         retry=RetryPolicy(attempts=1))
    agent = Agent(config, applier, HttpTransport(timeout_s=10))
    agent.start()
    outcomes = agent.run()
finally:
    server.stop()
served = applier.infer(texts)
leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
print(json.dumps({"same_after_switch": bool((a_out == again).all()), "labels": labels,
                  "outcomes": [[o.adapter_id, o.action] for o in outcomes],
                  "served": served.tolist(), "leaked": leaked}))
"""


@pytest.fixture(scope="module")
def board_world(minilm_bundle, tmp_path_factory):
    from solar_edge.devices.repo import Repository, signer_from_key
    from solar_edge.encode.solar import CodecConfig, encode
    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle
    from solar_edge.format.packet import PacketHeader
    from solar_edge.format.writer import encode_packet
    from solar_edge.methods.base import LayerUpdate

    work = tmp_path_factory.mktemp("board")
    bundle = load_bundle(minilm_bundle)
    key = signing.generate_private_key()
    signing.save_public_key(key, work / "k.pub")
    rng = np.random.default_rng(0)
    packets = {}
    for adapter_id, layers, meta in (("a", [0, 7], {"task": "a"}),
                                     ("b", [3, 20], {"task": "b", "labels": ["x", "y"],
                                                     "head_seed": 3})):
        ups = {lid: LayerUpdate(bundle.layers[lid].name,
                                rng.standard_normal((bundle.layers[lid].shape[0], 2),
                                                    dtype=np.float32) * 0.05,
                                rng.standard_normal((2, bundle.layers[lid].shape[1]),
                                                    dtype=np.float32) * 0.05)
               for lid in layers}
        res = encode(ups, {lid: bundle.layer_basis(lid) for lid in ups},
                     CodecConfig(representation="dense_factors"))
        data = encode_packet(PacketHeader(bundle.fingerprint, adapter_id, 1, meta), res.header,
                             res.records, key)
        (work / f"{adapter_id}.slr").write_bytes(data)
        packets[adapter_id] = data
    Repository(work / "repo", signer_from_key(key)).publish([packets["b"]])
    return work, minilm_bundle


@pytest.mark.parametrize("mechanism", ["initializer", "recreate"])
def test_board_path_runs_without_the_server_side(board_world, mechanism):
    work, bundle_dir = board_world
    (work / "args.json").write_text(json.dumps({"bundle": str(bundle_dir),
                                                "mechanism": mechanism}))
    shutil.rmtree(work / "device", ignore_errors=True)  # a fresh device per mechanism
    proc = subprocess.run([sys.executable, "-c", BOARD, ",".join(BOARD_BLOCKED), str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    assert out["same_after_switch"] is True
    assert set(out["labels"]) <= {"x", "y"} and len(out["labels"]) == 2
    assert out["outcomes"] == [["b", "installed"]]
    assert np.asarray(out["served"]).shape == (2, 2)  # the installed adapter's head serves


def test_the_blocker_really_blocks(tmp_path):
    code = BOARD.split("from solar_edge.devices.agent")[0] + "import torch\n"
    proc = subprocess.run([sys.executable, "-c", code, "torch", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


def test_the_blocked_list_names_real_modules():
    """Where the server side is installed, every blocked name exists: blocking is not vacuous."""
    import importlib.util

    pytest.importorskip("torch")
    missing = [m for m in BOARD_BLOCKED if m != "litert_torch"
               and importlib.util.find_spec(m) is None]
    assert missing == []
