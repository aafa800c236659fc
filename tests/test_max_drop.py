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


def _chosen(search: dict) -> dict:
    return next(p for p in search["points"]
                if (p["budget"], p["method"]) == (search["chosen"], search["chosen_method"]))


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
    chosen = _chosen(search)
    assert chosen["drop"] <= 2 and chosen["accuracy"] is not None
    # nothing smaller passed, codec or plain baseline
    assert all(p["drop"] > 2 for p in search["points"] if p["bytes"] < chosen["bytes"])
    assert {p["method"] for p in search["points"]} > {"codec"}  # the baselines were measured
    assert info["bytes"] == len(out.read_bytes())
    # the curve reports the chosen packet as written (digests, id, version), not the probe
    assert chosen["bytes"] == info["bytes"]
    if chosen["method"] == "codec":
        assert info["bytes"] <= chosen["budget"]
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


def test_a_plain_baseline_smaller_than_the_codec_pick_wins_when_it_passes():
    """Plain candidates at or above the codec's pick are not measured; the rest are, smallest
    first (the MAX_PLAIN largest of them), up to the first within the target."""
    import numpy as np

    from solar_edge.exporters import target_search
    from solar_edge.exporters.target_search import Measured, plain_within

    labels = np.array([0, 1, 2, 0])
    logits = np.eye(3)[labels]
    reference = Measured(labels, logits, 100.0, np.ones(4, bool))

    versions: list[int] = []

    def measure(packet: bytes) -> Measured:  # packets of 40+ bytes keep every answer
        versions.append(packet[0])
        assert versions == sorted(set(versions))  # as a runtime wants them: newer each time
        pred = labels if len(packet) >= 40 else np.array([1, 1, 2, 0])
        return Measured(pred, np.eye(3)[pred], float((pred == labels).mean() * 100),
                        pred == labels)

    sizes = [10, 20, 40, 90, 60, 50]  # not in size order
    count = iter(range(1, 256))
    candidates = [(f"c{n}", lambda n=n: bytes([next(count)]) + bytes(n - 1)) for n in sizes]
    won, tried = plain_within(candidates, measure, reference, 0.0, below=60)
    assert won == 2 and [p.nbytes for p in tried] == [10, 20, 40]
    assert tried[-1].method == "plain c40" and tried[-1].drop == 0.0
    assert [p.drop for p in tried[:2]] == [25.0, 25.0]
    won, tried = plain_within(candidates, measure, reference, -1.0, below=100)
    assert won is None and [p.nbytes for p in tried] == sorted(sizes)
    won, tried = plain_within(candidates, measure, reference, 0.0, below=40)
    assert won is None and [p.nbytes for p in tried] == [10, 20]
    target_search.MAX_PLAIN, saved = 2, target_search.MAX_PLAIN
    try:
        won, tried = plain_within(candidates, measure, reference, 0.0, below=100)
    finally:
        target_search.MAX_PLAIN = saved
    assert won == 4 and [p.nbytes for p in tried] == [60]  # only the two largest: 60, 90


def test_the_search_holds_its_pick_against_the_plain_baselines_as_anyone_makes_them(
        minilm_bundle, lora_adapter_dir):
    """Beside the codec's own uniform fits, the baselines themselves are candidates: a
    packet ``--max-drop`` returns is never larger than a plain baseline that also passes."""
    from solar_edge.encode.allocate import AllocConfig, layer_options, uniform_allocations
    from solar_edge.encode.baselines import plain_baselines
    from solar_edge.exporters.compress import prepare_adapter
    from solar_edge.exporters.compress_measure import plain_candidates
    from solar_edge.format.bundle import load_bundle
    from solar_edge.methods.peft_files import read_adapter

    bundle = load_bundle(minilm_bundle)
    prep = prepare_adapter(read_adapter(lora_adapter_dir), bundle)
    bases = {lid: bundle.layer_basis(lid) for lid in prep.updates}
    fits = layer_options(prep.updates, bases, {}, AllocConfig(max_rank=2))
    named = dict(plain_candidates(prep, bundle, fits, {}, None, 300))
    own = [n for n, _ in uniform_allocations(fits, 300)]
    baselines = plain_baselines(prep.updates, bases)
    assert list(named) == own + [f"baseline {n}" for n, _ in baselines]
    for name, records in baselines:
        alloc = named[f"baseline {name}"]
        assert [(r.layer_id, r.rank) for r in alloc.records] == \
            [(r.layer_id, r.rank) for r in records]
        assert all((a.values.codes == b.values.codes).all()
                   for a, b in zip(alloc.records, records, strict=True))
        assert alloc.total_bytes == 300 + sum(f.nbytes for f in alloc.chosen.values())


def test_embeddings_have_no_agreement_only_a_cosine_drop():
    import numpy as np

    from solar_edge.exporters.target_search import Measured, compare

    ref = np.eye(3)
    tilted = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    none = -np.ones(3, int)  # what a meter predicts for embeddings
    point = compare(Measured(none, tilted, None, None), Measured(none, ref, None, None), 10, 9)
    assert point.agreement is None  # predictions of -1 would all "agree"
    want_cos = (np.sqrt(0.5) + 2) / 3
    assert point.cosine == pytest.approx(want_cos)
    assert point.drop == pytest.approx(100 * (1 - want_cos))
