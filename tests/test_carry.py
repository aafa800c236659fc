"""``solar-edge compress --exact``: training-time relatives carried coefficient-only.

Real PEFT adapters: a VeRA (random scales) and a TinyLoRA trained for two steps by the
project's trainer. The written packet is decoded with the device's decoder and compared
with the adapter's own ``dW``; a LoRA (no regenerable basis) travels as its own float
factors; a TinyLoRA checked against a basis it was not built on is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from solar_edge.cli import cli
from solar_edge.encode.carry import carried_error, exact_records
from solar_edge.errors import AdapterError
from solar_edge.format import signing
from solar_edge.format.bundle import load_bundle
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import RecordKind, ValueFormat
from solar_edge.methods.matching import match_to_bundle
from solar_edge.methods.peft_files import read_adapter


@pytest.fixture(scope="module")
def tinylora_dir(tmp_path_factory: pytest.TempPathFactory, minilm_base) -> Path:
    from solar_edge.exporters.tasks import load_task
    from solar_edge.exporters.train import TrainConfig, train_adapter

    out = tmp_path_factory.mktemp("tiny") / "tinylora"
    config = TrainConfig(kind="tinylora", steps=2, batch_size=8, max_train=16, max_test=16)
    train_adapter(load_task("stdlib-docs"), out, config, base=minilm_base)
    return out


def _compress(adapter: Path, bundle: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["compress", str(adapter), "--bundle", str(bundle),
                                    "--exact", *extra, "--out", str(out)],
                              catch_exceptions=False)


@pytest.mark.parametrize("values", ["float32", "float16"])
def test_exact_packets_reproduce_the_adapter(vera_adapter_dir: Path, tinylora_dir: Path,
                                             minilm_bundle: Path, tmp_path: Path,
                                             values: str) -> None:
    bundle = load_bundle(minilm_bundle)
    for adir, kind in ((vera_adapter_dir, RecordKind.VERA_SCALES),
                       (tinylora_dir, RecordKind.SPARSE_CORE)):
        out = tmp_path / f"{adir.name}.slr"
        result = _compress(adir, minilm_bundle, out, "--values", values)
        assert result.exit_code == 0, result.output
        assert "carried exactly" in result.output
        key = signing.load_public_key(out.with_name(out.name + ".pub"))
        packet = decode_packet(out.read_bytes(), [key])
        assert {r.kind for r in packet.records} == {kind}
        updates = match_to_bundle(read_adapter(adir).updates, bundle.layers)
        assert {r.layer_id for r in packet.records} == set(updates)
        bases = {lid: bundle.layer_basis(lid) for lid in updates}
        error = carried_error(packet.records, updates, bases)
        # float32: PEFT's frozen TinyLoRA factors come from torch's float32 SVD, the bundle's
        # basis from a float64 SVD rounded to float32; the two differ by ~1e-5 relative
        assert error < (5e-5 if values == "float32" else 2e-3)
    small = (tmp_path / "tinylora.slr").stat().st_size
    assert small < 36 * (30 + 4 * 4) + 400  # 36 layers of 2x2 cores, nothing else


def test_a_lora_travels_exactly_as_its_own_factors_and_a_wrong_base_is_refused(
        lora_adapter_dir: Path, tinylora_dir: Path, minilm_bundle: Path,
        tmp_path: Path) -> None:
    for values, bound in (("float32", 1e-6), ("float16", 2e-3)):
        out = tmp_path / f"x-{values}.slr"
        result = CliRunner().invoke(cli, ["compress", str(lora_adapter_dir), "--bundle",
                                          str(minilm_bundle), "--exact", "--values", values,
                                          "--json", "--quiet", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["exact_error"] < bound
        packet = decode_packet(out.read_bytes(), None)
        lora = read_adapter(lora_adapter_dir)
        updates = match_to_bundle(lora.updates, load_bundle(minilm_bundle).layers)
        assert {r.layer_id for r in packet.records} == set(updates)
        assert {r.kind.name for r in packet.records} == {"DENSE_FACTORS"}
    bundle = load_bundle(minilm_bundle)
    adapter = read_adapter(tinylora_dir)
    updates = match_to_bundle(adapter.updates, bundle.layers)
    rng = np.random.default_rng(0)
    from solar_edge.format.bundle import LayerBasis

    wrong = {lid: LayerBasis(lid, *(np.linalg.qr(rng.standard_normal((d, d)))[0]
                                    .astype(np.float32) for d in (384, 384)))
             for lid in updates if tuple(bundle.layers[lid].shape) == (384, 384)}
    some = {lid: updates[lid] for lid in wrong}
    with pytest.raises(AdapterError, match="not this bundle's"):
        exact_records(adapter, some, wrong, ValueFormat.FLOAT32)
    usage = CliRunner().invoke(cli, ["compress", str(tinylora_dir), "--bundle",
                                     str(minilm_bundle), "--exact", "--budget", "900",
                                     "--out", str(tmp_path / "y.slr")])
    assert usage.exit_code == 2
