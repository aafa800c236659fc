"""A user's own SEQ_CLS adapter through the command line, end to end.

Trained the standard PEFT way (``LoraConfig(task_type="SEQ_CLS")``, classifier in
``modules_to_save``, ``save_pretrained``) for a few dozen steps on real texts, then:
``compress --calib-data texts.txt --max-drop 0.5`` (unlabelled calibration texts, the default
calibrated pipeline), ``run --texts FILE --json`` on held-out texts, whose labels must match
what PEFT predicts in torch on most of them, and ``unpack``, whose PEFT adapter must serve the
runtime's logits for the same packet.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

from solar_edge.cli import cli  # noqa: E402
from solar_edge.exporters.tasks import load_task  # noqa: E402

TASK = "stdlib-docs"
HELD_OUT = 40
AGREEMENT = 0.85  # board labels equal to PEFT's on at least this share of held-out texts
UNPACK_ATOL = 1e-3  # logits of the unpacked adapter in torch against the runtime's


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_model_dir):
    from solar_edge.exporters.train_peft import SeqClsConfig, train_seqcls

    root = tmp_path_factory.mktemp("own-e2e")
    task = load_task(TASK)
    config = SeqClsConfig(kind="seqcls-lora-qv-r8", base_dir=str(minilm_model_dir), steps=24,
                          batch_size=16, max_train=384, max_test=HELD_OUT)
    result = train_seqcls(task, root / "adapter", config)
    calib = root / "calib.txt"  # unlabelled training texts, one per line
    calib.write_text("".join(t + "\n" for t in task.train.texts[-64:]))
    held_out = task.test.texts[-HELD_OUT:]
    texts = root / "held_out.txt"
    texts.write_text("".join(t + "\n" for t in held_out))
    return {"dir": result.out_dir, "model": result.model, "tokenizer": result.tokenizer,
            "calib": calib, "texts": texts, "held_out": held_out, "root": root,
            "labels": list(task.label_names)}


def _peft_logits(model, tokenizer, texts: list[str]) -> np.ndarray:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits.numpy()


@pytest.mark.slow
def test_compress_run_and_unpack_a_users_seqcls_adapter(trained, minilm_bundle,
                                                        minilm_model_dir):
    root = trained["root"]
    packet = root / "task.slr"
    info = json.loads(_ok(["compress", str(trained["dir"]), "--bundle", str(minilm_bundle),
                           "--calib-data", str(trained["calib"]), "--max-drop", "0.5",
                           "--out", str(packet), "--quiet", "--json"]))
    assert info["bytes"] == packet.stat().st_size
    search = info["search"]
    assert search["points"][-1]["drop"] is not None
    chosen = next(p for p in search["points"]
                  if (p["budget"], p["method"]) == (search["chosen"], search["chosen_method"]))
    assert chosen["drop"] <= 0.5

    served = json.loads(_ok(["run", str(packet), "--bundle", str(minilm_bundle),
                             "--trusted-key", f"{packet}.pub", "--texts",
                             str(trained["texts"]), "--json"]))
    answers = served["answers"]
    assert [a["text"] for a in answers] == trained["held_out"]
    assert {a["label"] for a in answers} <= set(trained["labels"])  # the adapter's id2label
    want = _peft_logits(trained["model"], trained["tokenizer"], trained["held_out"])
    peft_labels = [trained["labels"][i] for i in want.argmax(-1)]
    agreement = np.mean([a["label"] == p for a, p in zip(answers, peft_labels, strict=True)])
    assert agreement >= AGREEMENT, agreement

    unpacked = root / "unpacked"
    _ok(["unpack", str(packet), "--bundle", str(minilm_bundle), "--out", str(unpacked),
         "--trusted-key", f"{packet}.pub", "--json"])
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from solar_edge.exporters.families.text_encoder import quiet_loading

    with quiet_loading():
        base = AutoModelForSequenceClassification.from_pretrained(
            str(minilm_model_dir), num_labels=len(trained["labels"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, str(unpacked))
    board = np.array([a["logits"] for a in answers])
    got = _peft_logits(model, trained["tokenizer"], trained["held_out"])
    np.testing.assert_allclose(got, board, atol=UNPACK_ATOL)
