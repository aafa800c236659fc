"""Classifiers on encoders other than BERT, as a user brings them: a tiny random ELECTRA
(whose ``classifier.dense`` / ``out_proj`` head applies GELU), RoBERTa (tanh) and DistilBERT
(``classifier(relu(pre_classifier))``, a BERT tokenizer saved beside it), each
exported, given a PEFT SEQ_CLS LoRA with its head in ``modules_to_save``, served by the board
and unpacked back to PEFT; the head math alone (``head_specs``, ``runtime.heads``); and
what the exporter makes of a tokenizer saved from another architecture."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from seqcls_adapter import save_with_moved_head  # noqa: E402

from solar_edge.errors import AdapterError  # noqa: E402
from solar_edge.format import signing  # noqa: E402

TEXTS = ["open a file and read it", "sort the numbers", "the socket closed",
         "format a date string"]
LABELS = ["a", "b", "c"]


TARGETS = {"electra": ["query", "value"], "roberta": ["query", "value"],
           "distilbert": ["q_lin", "v_lin"]}
ACTIVATION = {"electra": "gelu", "roberta": "tanh", "distilbert": "relu"}


def _tiny(kind: str):
    from transformers import DistilBertConfig, ElectraConfig, RobertaConfig

    labels = dict(num_labels=3, id2label=dict(enumerate(LABELS)),
                  label2id={n: i for i, n in enumerate(LABELS)})
    if kind == "distilbert":  # its own field names; a BERT tokenizer beside it
        return DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=130, **labels)
    common = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=130, **labels)
    if kind == "electra":
        return ElectraConfig(embedding_size=32, **common)
    return RobertaConfig(pad_token_id=0, **common)


@pytest.fixture(scope="module", params=list(TARGETS))
def encoder(request, tmp_path_factory, minilm_model_dir):
    """A tiny random encoder classifier of the param's kind (the MiniLM tokenizer beside it),
    its bundle, a PEFT LoRA with a trained-looking head, and that adapter's lossless packet."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from solar_edge.exporters.compress import prepare_adapter, sign_packet
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.methods.peft_files import read_adapter

    kind = request.param
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(kind)
    base = root / "base"
    AutoModelForSequenceClassification.from_config(_tiny(kind)).save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):
        if (minilm_model_dir / f).is_file():
            shutil.copy(minilm_model_dir / f, base / f)
    bundle = export_bundle(str(base), "x86-64", root / "bundle").bundle
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base),
                           LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                      target_modules=TARGETS[kind], init_lora_weights=False))
    save_with_moved_head(model, root / "adapter")
    key = signing.generate_private_key()
    prep = prepare_adapter(read_adapter(root / "adapter"), bundle)
    packet, _ = sign_packet(prep, lossless_records(prep), key, kind)
    return {"kind": kind, "root": root, "base": base, "bundle": bundle, "key": key,
            "packet": packet, "spec": prep.metadata["head"]}


def _torch_logits(base: Path, adapter: Path) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base),
                                      str(adapter)).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def test_the_board_serves_the_heads_own_activation(encoder):
    from solar_edge.runtime.engine import EdgeRuntime

    assert encoder["spec"]["activation"] == ACTIVATION[encoder["kind"]]
    rt = EdgeRuntime(str(encoder["root"] / "bundle"), [encoder["key"].public_key()])
    rt.apply(encoder["packet"])
    got = rt.infer(TEXTS)
    want = _torch_logits(encoder["base"], encoder["root"] / "adapter")
    assert got.shape == want.shape == (len(TEXTS), 3)
    assert np.abs(want).max() > 0.1  # the head computes something to compare
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert rt.classify(TEXTS) == [LABELS[i] for i in want.argmax(1)]


def test_an_unpacked_packet_loads_into_peft_and_computes_the_same(encoder, tmp_path):
    from solar_edge.exporters.unpack import unpack_packet
    from solar_edge.runtime.engine import EdgeRuntime

    result = unpack_packet(encoder["packet"], encoder["bundle"], tmp_path / "u",
                           [encoder["key"].public_key()])
    assert result.task_type == "SEQ_CLS" and result.verified
    rt = EdgeRuntime(str(encoder["root"] / "bundle"), [encoder["key"].public_key()])
    rt.apply(encoder["packet"])
    np.testing.assert_allclose(_torch_logits(encoder["base"], tmp_path / "u"),
                               rt.infer(TEXTS), atol=1e-4)


def test_a_dense_heads_activation_comes_from_the_model_type():
    from solar_edge.exporters.head_specs import dense_head_activation

    assert dense_head_activation("roberta") == "tanh"
    assert dense_head_activation("xlm-roberta") == "tanh"
    assert dense_head_activation(None) == "tanh"
    assert dense_head_activation("electra") == "gelu"
    assert dense_head_activation("roformer", "relu") == "relu"
    with pytest.raises(AdapterError, match="hidden_act"):
        dense_head_activation("roformer", "gelu_new")
    with pytest.raises(AdapterError, match="which activation"):
        dense_head_activation("funnel")


def test_the_boards_gelu_is_torchs():
    from solar_edge.runtime.heads import ACTIVATIONS

    x = np.linspace(-8, 8, 2001).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    got = ACTIVATIONS["gelu"](x)
    assert got.dtype == np.float32
    assert (np.abs(got - want) <= 1e-6 * np.maximum(1, np.abs(x))).all()
    assert np.abs(ACTIVATIONS["gelu"](x) - np.tanh(x)).max() > 0.1  # not the tanh head


def test_tokenizer_outputs_the_model_does_not_take_are_not_traced_inputs():
    """A BERT tokenizer saved beside DistilBERT returns token_type_ids, which DistilBERT's
    forward does not take: the graph must not be fed them."""
    from solar_edge.errors import ExportError
    from solar_edge.exporters.families.text_encoder import forward_inputs

    class NoTypes(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return input_ids

    enc = {"input_ids": torch.ones(1, 3), "token_type_ids": torch.zeros(1, 3),
           "attention_mask": torch.ones(1, 3)}
    assert list(forward_inputs(NoTypes(), enc)) == ["input_ids", "attention_mask"]

    class WithTypes(torch.nn.Module):
        def forward(self, input_ids=None, token_type_ids=None, attention_mask=None):
            return input_ids

    assert list(forward_inputs(WithTypes(), enc)) == list(enc)
    with pytest.raises(ExportError, match="input_ids"):
        forward_inputs(NoTypes(), {"pixel_values": torch.ones(1)})
