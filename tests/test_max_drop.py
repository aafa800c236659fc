"""``solar-edge compress --max-drop``: the smallest packet within an accuracy target, measured
as the board serves it, on held-back calibration texts or a labelled evaluation file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from solar_edge.cli import cli  # noqa: E402
from solar_edge.exporters.tasks import load_task  # noqa: E402


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("maxdrop")
    task = load_task("stdlib-docs")
    txt = root / "calib.txt"
    txt.write_text("\n".join(task.train.texts[:80]) + "\n")
    jsonl = root / "eval.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": task.label_names[y]}) + "\n"
                             for t, y in zip(task.test.texts[:60], task.test.labels[:60],
                                             strict=True)))
    return {"txt": txt, "jsonl": jsonl}


def _compress(*args: str):
    return CliRunner().invoke(cli, ["compress", *args])


def test_the_smallest_packet_within_the_target_is_chosen(minilm_bundle, lora_adapter_dir,
                                                         texts, tmp_path):
    out = tmp_path / "p.slr"
    plot = tmp_path / "curve.png"
    result = _compress(str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--max-drop",
                       "2", "--eval-data", str(texts["jsonl"]), "--plot", str(plot),
                       "--json", "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    search = info["search"]
    points = {p["budget"]: p for p in search["points"]}
    chosen = points[search["chosen"]]
    assert chosen["drop"] <= 2 and chosen["accuracy"] is not None
    assert all(p["drop"] > 2 for b, p in points.items() if b < search["chosen"])
    assert info["bytes"] == len(out.read_bytes()) <= search["chosen"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loose = _compress(str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--max-drop",
                      "100", "--eval-data", str(texts["jsonl"]), "--json", "--quiet",
                      "--out", str(tmp_path / "q.slr"))
    assert loose.exit_code == 0, loose.output
    assert json.loads(loose.output)["bytes"] <= info["bytes"]


def test_calibration_texts_are_held_back_to_measure_on(minilm_bundle, lora_adapter_dir, texts,
                                                       tmp_path):
    result = _compress(str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--max-drop",
                       "5", "--metric", "act", "--calib-data", str(texts["txt"]), "--refit", "0",
                       "--json", "--quiet", "--out", str(tmp_path / "p.slr"))
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert "held-back" in info["search"]["measured_on"]
    assert "calibration part" in info["calibration"]
    assert info["search"]["reference_accuracy"] is None  # unlabelled: agreement


def test_max_drop_without_texts_is_one_clear_line(minilm_bundle, lora_adapter_dir, tmp_path):
    result = _compress(str(lora_adapter_dir), "--bundle", str(minilm_bundle), "--max-drop",
                       "1", "--out", str(tmp_path / "p.slr"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--eval-data" in lines[0]


def test_a_lost_text_is_not_paid_for_by_a_gained_one():
    """Net accuracy would call this packet lossless; it lost one text in four."""
    import numpy as np

    from solar_edge.exporters.target_search import Measured, compare

    labels = np.array([0, 1, 2, 0])
    ref_pred, pkt_pred = np.array([0, 1, 2, 1]), np.array([0, 1, 1, 0])
    logits = np.eye(3)[ref_pred]

    def measured(pred):
        return Measured(pred, logits, float((pred == labels).mean() * 100), pred == labels)

    point = compare(measured(pkt_pred), measured(ref_pred), 100, 90)
    assert point.accuracy == 75.0 and point.agreement == 50.0
    assert point.drop == 25.0
