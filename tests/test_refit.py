"""Output-matching refit (:mod:`solar_edge.exporters.refit`).

Unit level (no model): what the refit's forward pass uses is exactly what the device decodes
from the returned record. Model level (real MiniLM bundle, real LoRA trained by the project):
the refit keeps every record's structure and byte size, lowers the output loss, and the
packet it gives decodes and verifies; a model that is not the bundle's base is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from solar_edge.decode import decode_factors
from solar_edge.encode.quant import mse_quantize
from solar_edge.errors import CodecError, ExportError
from solar_edge.format import signing
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import record_nbytes
from solar_edge.format.records import CodecHeader, LayerRecord, RecordKind, ValueFormat

torch = pytest.importorskip("torch")
refit = pytest.importorskip("solar_edge.exporters.refit")

from solar_edge.exporters.families import open_bundle_model  # noqa: E402
from solar_edge.exporters.heads import head_for  # noqa: E402
from solar_edge.exporters.patches import adapter_patches  # noqa: E402


def _record(kind: RecordKind, fmt: ValueFormat, rng: np.random.Generator) -> LayerRecord:
    rows, cols, rank = 24, 16, 3
    values = rng.standard_normal(rows * rank + cols * rank).astype(np.float32)
    values[:64] = 0.0  # one all-zero group: its scale is 0 and must stay 0
    return LayerRecord(7, kind, rows, cols, rank, mse_quantize(values, fmt, 64))


@pytest.mark.parametrize("kind", [RecordKind.DENSE_FACTORS, RecordKind.FACTORED_CORE])
@pytest.mark.parametrize("fmt", [ValueFormat.INT2, ValueFormat.INT4, ValueFormat.INT8])
def test_trained_values_are_what_the_device_decodes(kind: RecordKind, fmt: ValueFormat) -> None:
    rng = np.random.default_rng(int(fmt) * 10 + int(kind))
    record = _record(kind, fmt, rng)
    basis = None
    if kind == RecordKind.FACTORED_CORE:
        U = np.linalg.qr(rng.standard_normal((24, 24)))[0].astype(np.float32)
        V = np.linalg.qr(rng.standard_normal((16, 16)))[0].astype(np.float32)
        basis = LayerBasis(7, U, V)
    params = refit._RecordParams(record, basis)
    with torch.no_grad():  # what an optimiser would do: move codes and scales
        params.u.add_(torch.from_numpy(rng.normal(0, 2.0, params.u.shape).astype(np.float32)))
        params.log_s.add_(torch.from_numpy(rng.normal(0, 0.3, params.log_s.shape)
                                           .astype(np.float32)))
        L_t, Rt_t = (x.numpy() for x in params.factors())
    out = params.to_record()
    assert (out.kind, out.rows, out.cols, out.rank) == (kind, 24, 16, 3)
    assert out.values.fmt == fmt and record_nbytes(out) == record_nbytes(record)
    q = (1 << (fmt.bits - 1)) - 1
    assert np.abs(out.values.codes).max() <= q
    assert out.values.scales[0] == 0 and np.all(out.values.codes[:64] == 0)
    assert not np.array_equal(out.values.codes, record.values.codes)
    L, Rt = decode_factors(out, basis, CodecHeader(seed=0))
    np.testing.assert_allclose(L, L_t, rtol=0, atol=1e-5)
    np.testing.assert_allclose(Rt, Rt_t, rtol=0, atol=1e-5)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(CodecError):
        refit.RefitConfig(steps=-1)
    with pytest.raises(CodecError):
        refit.RefitConfig(lr=0.0)


@pytest.fixture(scope="module")
def allocated(minilm_bundle: Path, lora_adapter_dir: Path):
    from solar_edge.encode.allocate import AllocConfig, encode_adapter
    from solar_edge.exporters.tasks import load_task
    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.matching import match_to_bundle
    from solar_edge.methods.peft_files import read_adapter

    bundle = load_bundle(minilm_bundle)
    adapter = read_adapter(lora_adapter_dir)
    updates = match_to_bundle(adapter.updates, bundle.layers)
    bases = {lid: bundle.layer_basis(lid) for lid in updates}
    alloc = encode_adapter(updates, bases, {}, AllocConfig(max_rank=2), budget_bytes=2500)
    texts = list(load_task("stdlib-docs").train.texts[:48])
    model = open_bundle_model(bundle)
    head = head_for(adapter.task_meta, model.hidden_size)
    return bundle, adapter, updates, bases, alloc, texts, model, head


def test_refit_keeps_structure_and_bytes_and_lowers_the_output_loss(allocated) -> None:
    bundle, adapter, updates, bases, alloc, texts, model, head = allocated
    seen: list[int] = []
    teacher = adapter_patches(bundle, updates)
    report = refit.refit_records(model, bundle, alloc.records, teacher, bases, texts, head,
                                 refit.RefitConfig(steps=10, batch=8),
                                 progress=lambda step, total, loss: seen.append(step))
    assert seen == list(range(1, 11))
    assert report.loss_after < report.loss_before
    assert all(p.requires_grad for p in model.module.parameters())  # the model is left as given
    assert len(report.records) == len(alloc.records)
    changed = 0
    for old, new in zip(alloc.records, report.records, strict=True):
        assert (new.layer_id, new.kind, new.rows, new.cols, new.rank) == (
            old.layer_id, old.kind, old.rows, old.cols, old.rank)
        assert new.values.fmt == old.values.fmt and record_nbytes(new) == record_nbytes(old)
        changed += not (np.array_equal(new.values.codes, old.values.codes)
                        and np.array_equal(new.values.scales, old.values.scales))
    assert changed > 0


def test_a_model_that_is_not_the_bundles_base_is_refused(allocated, tmp_path: Path) -> None:
    bundle = allocated[0]
    from solar_edge.exporters.train import load_base

    tok, model = load_base()
    with torch.no_grad():
        next(iter(model.encoder.layer[0].attention.self.query.parameters())).mul_(1.01)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ExportError, match="not the bundle's base"):
        open_bundle_model(bundle, tmp_path)


def test_compress_with_refit_writes_a_packet_within_budget(minilm_bundle: Path,
                                                          lora_adapter_dir: Path,
                                                          tmp_path: Path) -> None:
    from solar_edge.cli import cli
    from solar_edge.format.reader import decode_packet

    out = tmp_path / "r.slr"
    result = CliRunner().invoke(cli, [
        "compress", str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--budget", "2500",
        "--max-rank", "2", "--refit", "4", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "refit (4 steps" in result.output and len(out.read_bytes()) <= 2500
    key = signing.load_public_key(out.with_name(out.name + ".pub"))
    assert decode_packet(out.read_bytes(), [key]).records
    bad = CliRunner().invoke(cli, [
        "compress", str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--max-error", "0.5",
        "--refit", "4", "--out", str(tmp_path / "x.slr")])
    assert bad.exit_code == 2 and "--refit" in bad.output
