"""``solar-edge compress`` on a real MiniLM bundle and a real PEFT LoRA trained by the project.

The packet is read back with the packet reader and the public key, decoded with the codec
decoder, and its error is recomputed from the adapter's own factors, independently of the
numbers the encoder printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from solar_edge.cli import cli
from solar_edge.decode import decode_factors
from solar_edge.format import signing
from solar_edge.format.bundle import load_bundle
from solar_edge.format.reader import decode_packet
from solar_edge.methods.matching import match_to_bundle
from solar_edge.methods.peft_files import read_adapter


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    result = CliRunner().invoke(cli, ["keygen", "--out", str(out), "--name", "k"])
    assert result.exit_code == 0, result.output
    return out


def _run(args: list[str]):
    return CliRunner().invoke(cli, ["compress", *args], catch_exceptions=False)


def _relative_fro(bundle_dir: Path, adapter_dir: Path, packet_path: Path,
                  pub: Path) -> tuple[float, int]:
    bundle = load_bundle(bundle_dir)
    updates = match_to_bundle(read_adapter(adapter_dir).updates, bundle.layers)
    packet = decode_packet(packet_path.read_bytes(), [signing.load_public_key(pub)])
    assert packet.header.fingerprint == bundle.fingerprint
    recs = {r.layer_id: r for r in packet.records}
    num = den = 0.0
    for lid, u in updates.items():
        dw = u.B.astype(np.float64) @ u.A.astype(np.float64)
        approx = np.zeros_like(dw)
        if lid in recs:
            L, Rt = decode_factors(recs[lid], bundle.layer_basis(lid), packet.codec)
            approx = L.astype(np.float64) @ Rt.T.astype(np.float64)
        num += ((dw - approx) ** 2).sum()
        den += (dw**2).sum()
    return float(np.sqrt(num / den)), len(recs)


@pytest.mark.parametrize("budget", [1500, 6000])
def test_budget_is_respected(minilm_bundle: Path, lora_adapter_dir: Path, key_dir: Path,
                             tmp_path: Path, budget: int) -> None:
    out = tmp_path / "a.slr"
    result = _run([str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--budget",
                   str(budget), "--key", str(key_dir / "k.key"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size <= budget
    err, n_records = _relative_fro(minilm_bundle, lora_adapter_dir, out, key_dir / "k.pub")
    assert 0 < err < 1 and n_records >= 1
    # per-layer table: one row per adapted module, then totals and link times
    adapter = read_adapter(lora_adapter_dir)
    for name in adapter.updates:
        assert name in result.output
    assert f"{out.stat().st_size} B written" in result.output
    # the budget counts the written packet: zstd's savings were spent on more of the adapter
    before_zstd = int(re.search(r"\((\d+) B before zstd", result.output).group(1))
    assert before_zstd > budget >= out.stat().st_size
    assert re.search(r"download on wifi\s+[\d.]+ s\s+<- profile x86-64", result.output)
    printed = float(re.search(r"overall relative error ([\d.]+)", result.output).group(1))
    assert printed == pytest.approx(err, abs=2e-4)


def test_max_error_meets_its_bound_and_tighter_costs_more(
        minilm_bundle: Path, lora_adapter_dir: Path, key_dir: Path, tmp_path: Path) -> None:
    sizes = []
    for bound in (0.9, 0.6):
        out = tmp_path / f"{bound}.slr"
        result = _run([str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--max-error",
                       str(bound), "--key", str(key_dir / "k.key"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        err, _ = _relative_fro(minilm_bundle, lora_adapter_dir, out, key_dir / "k.pub")
        assert bound / 4 < err <= bound  # met, and not by sending everything
        sizes.append(out.stat().st_size)
    assert sizes[0] < sizes[1]


def test_needs_exactly_one_of_budget_and_max_error(minilm_bundle: Path, lora_adapter_dir: Path,
                                                   tmp_path: Path) -> None:
    base = [str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--out", str(tmp_path / "c")]
    assert _run(base).exit_code != 0
    assert _run([*base, "--budget", "2000", "--max-error", "0.5"]).exit_code != 0


def test_budget_too_small_is_a_typed_error(minilm_bundle: Path, lora_adapter_dir: Path,
                                           tmp_path: Path) -> None:
    from solar_edge.errors import BudgetError

    for budget in ("200", "500"):  # the user's budget is what the error names
        with pytest.raises(BudgetError, match=rf"budget {budget} B .*give at least \d+ B"):
            _run([str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--budget", budget,
                  "--out", str(tmp_path / "d.slr")])


def test_without_key_writes_the_public_half(minilm_bundle: Path, lora_adapter_dir: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "e.slr"
    result = _run([str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--budget", "3000",
                   "--out", str(out)])
    assert result.exit_code == 0, result.output
    _relative_fro(minilm_bundle, lora_adapter_dir, out, tmp_path / "e.slr.pub")


@pytest.mark.parametrize("kwargs", [{}, {"budget": 10, "max_error": 0.1},
                                    {"budget": 10, "metric": "l1"},
                                    {"max_error": 0.1, "refit_steps": 5}])
def test_compress_options_refuse_inconsistent_settings(kwargs: dict) -> None:
    from solar_edge.errors import CodecError
    from solar_edge.exporters.compress import CompressOptions

    with pytest.raises(CodecError):
        CompressOptions(**kwargs)


def test_quantisation_error_is_weighed_at_one_half_only_without_data() -> None:
    """Data-free fits (metric fro) weigh what quantisation adds at one half by default; the
    calibrated metrics keep it at full weight; an explicit weight wins either way."""
    from solar_edge.exporters.compress import DATA_FREE_QUANT_WEIGHT, CompressOptions

    assert DATA_FREE_QUANT_WEIGHT == 0.5
    assert CompressOptions(budget=10).effective_quant_weight == 0.5
    assert CompressOptions(budget=10, metric="fisher").effective_quant_weight == 1.0
    assert CompressOptions(budget=10, metric="act").effective_quant_weight == 1.0
    assert CompressOptions(budget=10, quant_weight=1.0).effective_quant_weight == 1.0
    assert CompressOptions(budget=10, metric="fisher",
                           quant_weight=0.25).effective_quant_weight == 0.25


def test_refit_without_a_task_name_is_a_calibration_error(minilm_bundle: Path,
                                                          lora_adapter_dir: Path,
                                                          tmp_path: Path) -> None:
    import json
    import shutil

    from solar_edge.errors import CalibrationError
    from solar_edge.exporters.compress import CompressOptions, compress_adapter

    adir = tmp_path / "a"
    shutil.copytree(lora_adapter_dir, adir)
    meta = json.loads((adir / "task.json").read_text())
    del meta["task"]
    (adir / "task.json").write_text(json.dumps(meta))
    with pytest.raises(CalibrationError, match="calib-data"):
        compress_adapter(adir, load_bundle(minilm_bundle), signing.generate_private_key(),
                         CompressOptions(budget=3000, refit_steps=2))
    result = _run([str(adir), "--bundle", str(minilm_bundle), "--budget", "3000",
                   "--refit", "2", "--out", str(tmp_path / "x.slr")])
    assert result.exit_code == 1 and "calib-data" in result.output


def test_calib_data_defaults_for_an_adapter_without_a_head(minilm_bundle: Path, minilm_base,
                                                           tmp_path: Path) -> None:
    """A feature-extraction LoRA (no classifier, no seeded head) has no class outputs for
    fisher or the refit to match: --calib-data alone must still compress, with act."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from solar_edge.exporters.adapter_checks import has_task_head

    _, model = minilm_base
    peft_model = get_peft_model(copy.deepcopy(model),
                                LoraConfig(r=4, target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    adir = tmp_path / "embed"
    peft_model.save_pretrained(str(adir))
    assert not has_task_head(read_adapter(adir))
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"Return the item number {i} of the list." for i in range(16)))
    out = tmp_path / "e.slr"
    result = _run([str(adir), "--bundle", str(minilm_bundle), "--budget", "6000",
                   "--calib-data", str(calib), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "metric act:" in result.output and not re.search(r"refit \(\d+ steps",
                                                             result.output)
    assert "no classifier head" in result.output and "--metric defaults to act" in result.output
    assert "--refit defaults to 0" in result.output
    assert len(out.read_bytes()) <= 6000


def test_calibration_defaults_refit_a_budget_but_not_an_accuracy_target() -> None:
    """With calibration data: fisher everywhere; the refit only with --budget (it measured
    larger packets at --max-drop targets on the served benchmark)."""
    from solar_edge.exporters.compress_cli import DEFAULT_REFIT, _defaults

    calib = Path("texts.txt")
    assert _defaults(None, None, calib, False, None) == ("fisher", DEFAULT_REFIT, [])
    assert _defaults(None, None, calib, False, None, max_drop=0.5) == ("fisher", 0, [])
    assert _defaults(None, None, calib, False, 0.1) == ("fisher", 0, [])
    assert _defaults(None, 30, calib, False, None, max_drop=0.5) == ("fisher", 30, [])
    assert _defaults(None, None, None, False, None, max_drop=0.5)[:2] == ("fro", 0)
    # without a head the note names only what was defaulted, not a --refit that was given
    (note,) = _defaults(None, 40, calib, False, None, has_head=False)[2]
    assert "--metric defaults to act" in note and "refit" not in note
    assert _defaults("act", 40, calib, False, None, has_head=False) == ("act", 40, [])
