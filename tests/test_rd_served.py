"""The served benchmark of standard PEFT classifiers (``bench/rd.py`` -> ``bench/rd_served.py``).

One tiny SEQ_CLS LoRA adapter (``save_pretrained``, classifier in ``modules_to_save``) on the
real MiniLM and a head-only reference, on a bundle whose only adaptable weights are the two
the adapter trains (a quick export), with tiny splits: every row's bytes are the length of the
packet it measured, every packet carries the head, the lossless packet serves what PEFT
computes in torch, and the JSON, markdown table and plot are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from seqcls_adapter import save_adapter, seqcls_peft_model  # noqa: E402

from solar_edge.format.reader import decode_packet  # noqa: E402
from solar_edge.format.records import RecordKind  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"
TASK = "pydoc-topics"
LABELS = ["lexical", "expressions", "statements", "datamodel", "stdtypes"]
TARGETS = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]


def _adapters(root: Path, model_dir: Path) -> Path:
    from safetensors.torch import save_file

    pm, model = seqcls_peft_model(model_dir, LABELS, r=2, targets=TARGETS, noise=0.1)
    lora, head = root / TASK / "seqcls-lora-tiny", root / TASK / "seqcls-head-only"
    save_adapter(pm, model, lora)
    head.mkdir(parents=True)
    classifier = pm.base_model.model.classifier.modules_to_save["default"]
    save_file({k: v.detach().contiguous() for k, v in classifier.state_dict().items()},
              str(head / "head.safetensors"))
    model.config.save_pretrained(str(head))
    for d in (lora, head):
        (d / "metrics.json").write_text(json.dumps({"task": TASK}))
    return root


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    from solar_edge.exporters.pipeline import export_bundle

    out = tmp_path_factory.mktemp("rd-served") / "bundle"
    export_bundle(None, "x86-64", out, target_modules=TARGETS)
    return out


def test_served_bench_measures_every_packet_it_signs(small_bundle, minilm_model_dir, tmp_path,
                                                     monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import rd

    from solar_edge.encode import baselines as baseline_set
    from solar_edge.format.records import ValueFormat

    int4 = {"int4": ValueFormat.INT4}  # fewer baselines (the bench's and compress's)
    monkeypatch.setattr(baseline_set, "OWN_FORMATS", int4)
    monkeypatch.setattr(baseline_set, "RETRUNCATION_RANKS", (1,))
    monkeypatch.setattr(baseline_set, "RETRUNCATION_FORMATS", int4)
    adapters = _adapters(tmp_path / "adapters", minilm_model_dir)
    out, packets = tmp_path / "out" / "rd.json", tmp_path / "packets"
    assert rd.main(["--bundle", str(small_bundle), "--adapters", str(adapters), "--out",
                    str(out), "--val", "16", "--max-eval", "16", "--calib-texts", "16",
                    "--refit-steps", "2", "--max-drop", "100", "--packets", str(packets)]) == 0
    report = json.loads(out.read_text())
    lora, head = (report["adapters"][f"{TASK}/{k}"] for k in ("seqcls-lora-tiny",
                                                               "seqcls-head-only"))
    families = {p["family"] for p in lora["points"]}
    assert families == {"reference", "lora-int", "rank", "data-free", "calibrated"}
    points = [(name, p) for name, r in report["adapters"].items() for p in r["points"]]
    smallest = min(p["bytes"] for _, p in points if p["family"] in ("lora-int", "rank"))
    failed = [p for _, p in points if "bytes" not in p]
    # Only a data-free ladder budget below every baseline may fail to hold its overhead.
    assert all(p["family"] == "data-free" and int(p["setting"].split()[-1]) < smallest
               and "cannot hold" in p["error"] for p in failed), failed
    built = [(name, p) for name, p in points if "bytes" in p]
    for name, p in built:
        path = packets / name.replace("/", ".") / (
            f"{p['family']}.{p['setting'].replace(' ', '_')}.slr")
        data = path.read_bytes()
        assert len(data) == p["bytes"], (name, p["setting"])
        packet = decode_packet(data, None)
        kinds = [r.kind for r in packet.records]
        assert kinds.count(RecordKind.HEAD_TENSOR) == 2, (name, p["setting"])  # weight, bias
        assert packet.header.metadata["labels"] == LABELS
        assert packet.header.metadata["head"]["weight"] == "classifier.weight"
        assert p["n"] == p["val_n"] == 16 and 0 <= p["agreement"] <= 1
    ref = lora["points"][0]
    assert ref["family"] == "reference" and ref["agreement"] == 1.0 and ref["val_lost"] == 0
    assert all(0 <= p["val_lost"] <= 100 * (1 - p["val_accuracy"]) + 1e-9 for _, p in built)
    assert ref["file_bytes"] == (adapters / TASK / "seqcls-lora-tiny" /
                                 "adapter_model.safetensors").stat().st_size
    for r in (lora, head):  # the lossless packet serves what torch computes
        assert r["torch"]["agreement_with_served"] >= 15 / 16
        assert abs(r["torch"]["accuracy"] - r["points"][0]["accuracy"]) <= 1 / 16 + 1e-9
    refit, bare = (next(p for p in lora["points"] if p["family"] == "calibrated"
                        and p["setting"] == setting)
                   for setting in ("max-drop 100", "max-drop 100 no refit"))
    assert refit["refit_steps"] == 2 and bare["refit_steps"] == 0
    # a 100-point target: a plain baseline below the codec's pick may win, and it is not refit
    won = refit["search"]["chosen_method"]
    assert refit["refit_texts"] == (16 if won == "codec" else 0) and won.startswith(
        ("codec", "plain r"))
    for p in (refit, bare):
        assert p["metric"] == "fisher" and p["search"]["points"]
    assert bare["cli_default"] and not refit["cli_default"]  # --max-drop: no refit
    calibrated = bare
    s = lora["summary"]
    baselines = [p for p in lora["points"] if p["family"] in ("lora-int", "rank")]
    assert s["best_baseline"]["bytes"] == min(p["bytes"] for p in baselines)  # 100-pt drop
    assert s["ratio"] == pytest.approx(calibrated["bytes"] / s["best_baseline"]["bytes"])
    assert s["calibrated_other"]["bytes"] == refit["bytes"]
    assert len(s["data_free_margins"]) == len(baselines)
    for m in s["data_free_margins"]:  # the data-free packet at each baseline's size fits it
        df = next(p for p in lora["points"] if p["setting"] == f"budget {m['bytes']}")
        assert df["bytes"] <= m["bytes"]
        assert 0 <= m["p"] <= 1 and m["only_data_free"] + m["only_baseline"] <= 16
    assert isinstance(s["data_free_significantly_below"], list)
    md = out.with_suffix(".md").read_text()
    assert f"| {TASK}/seqcls-lora-tiny |" in md and "(base + trained head)" in md
    assert out.with_suffix(".png").stat().st_size > 1000
    assert (out.parent / "calib" / f"{TASK}.txt").read_text().count("\n") == 16
    cached = json.loads(out.with_suffix(".cache.json").read_text())
    assert len(cached) == len(points) + 2  # every point and both torch runs

    # A second run from the cache with one baseline more: the new row is measured against
    # the cached reference's validation predictions.
    monkeypatch.setattr(baseline_set, "RETRUNCATION_FORMATS", {**int4, "int8": ValueFormat.INT8})
    assert rd.main(["--bundle", str(small_bundle), "--adapters", str(adapters), "--out",
                    str(out), "--val", "16", "--max-eval", "16", "--calib-texts", "16",
                    "--refit-steps", "2", "--max-drop", "100"]) == 0
    again = json.loads(out.read_text())["adapters"][f"{TASK}/seqcls-lora-tiny"]["points"]
    new = next(p for p in again if p["setting"] == "r1-int8")
    assert new["val_lost"] is not None and 0 <= new["val_lost"] <= 100
    assert "val_predictions" not in again[0]


def test_the_best_baseline_is_chosen_on_lost_texts_not_net_accuracy(monkeypatch):
    """A baseline as accurate as the reference on validation that loses 2 points of its texts
    (and gains 2 others) is not within 0.5: the codec's --max-drop would not accept it."""
    monkeypatch.syspath_prepend(str(BENCH))
    import rd_served_report as report

    ref = {"family": "reference", "setting": "lossless fp32", "bytes": 9000,
           "val_accuracy": 0.7, "val_lost": 0.0}
    swaps = {"family": "rank", "setting": "r1-int4", "bytes": 1000, "val_accuracy": 0.7,
             "val_lost": 2.0}
    close = {"family": "lora-int", "setting": "int4", "bytes": 3000, "val_accuracy": 0.695,
             "val_lost": 0.5}
    assert report.best_baseline([ref, swaps, close], 0.5)["setting"] == "int4"
    assert report.best_baseline([ref, swaps], 0.5) is None
    assert report.best_baseline([ref, swaps, close], 2.0)["setting"] == "r1-int4"


def test_a_data_free_loss_counts_only_when_its_paired_test_says_so(monkeypatch):
    """3 texts lost of 100 is noise (exact McNemar p 0.25); 10 lost and none won is a loss."""
    monkeypatch.syspath_prepend(str(BENCH))
    import rd_eval
    import rd_served_report as report

    assert rd_eval.mcnemar_p(0, 0) == 1.0
    assert rd_eval.mcnemar_p(6, 0) == pytest.approx(2 / 64)
    assert rd_eval.mcnemar_p(3, 5) == rd_eval.mcnemar_p(5, 3) == pytest.approx(2 * 93 / 256)

    def point(family, setting, nbytes, right):
        return {"family": family, "setting": setting, "bytes": nbytes, "val_accuracy": 0.7,
                "val_lost": 0.0, "accuracy": sum(right) / len(right), "ci95": [0, 1]}, right

    ref = [True] * 80 + [False] * 20
    rows = [point("reference", "lossless fp32", 9000, ref),
            point("rank", "r4-int4", 1000, ref),
            point("data-free", "budget 1000", 900, [False] * 3 + ref[3:]),
            point("rank", "r8-int4", 2000, ref),
            point("data-free", "budget 2000", 1900, [False] * 10 + ref[10:])]
    points = [p for p, _ in rows]
    right = {(p["family"], p["setting"]): r for p, r in rows}
    s = report.summarise(points, 0.5, right)
    by = {m["baseline"]: m for m in s["data_free_margins"]}
    assert by["r4-int4"]["only_baseline"] == 3 and by["r4-int4"]["p"] == pytest.approx(0.25)
    assert by["r8-int4"]["p"] == pytest.approx(2 / 1024)
    assert s["data_free_significantly_below"] == ["r8-int4"]
    assert not s["data_free_ok"]
    assert report.summarise(points, 0.5)["data_free_significantly_below"] is None
    # variants at a baseline's bytes get their own margins; other suffixes are not variants
    extra = [point("data-free", "budget 1000 q0.5", 950, ref),
             point("data-free", "budget 2000 no-cover", 1900, [False] * 20 + ref[20:]),
             point("data-free", "budget 1000 rmax2", 990, ref)]
    rows += extra
    right = {(p["family"], p["setting"]): r for p, r in rows}
    variants = report.summarise([p for p, _ in rows], 0.5, right)["data_free_variants"]
    assert sorted(variants) == ["no-cover", "q0.5"]
    assert [(m["baseline"], m["margin"]) for m in variants["q0.5"]] == [("r4-int4", 0.0)]
    assert variants["no-cover"][0]["only_baseline"] == 20
