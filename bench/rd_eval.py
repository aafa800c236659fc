"""Task accuracy of a set of weight updates ``dW`` merged into the bundle's ONNX graph.

:class:`PatchedEvaluator` opens one onnxruntime session on ``model.onnx`` whose adaptable
weights are caller-owned numpy buffers (``SessionOptions.add_initializer`` with
``session.disable_prepacking``), so evaluating another update set costs a buffer copy,
not a session: ``buffer = (W0 + dW).T`` in place, then run the capped held-out split. The
first call checks that in-place edits are really seen (against a fresh session).

:func:`calibration_grams` (from :mod:`solar_edge.exporters.calibration`) gives each adapted
layer's input Gram ``G = X^T X / tokens`` on calibration texts (base model), which weighs the
activation-aware error ``sqrt(tr(E G E^T) / tr(dW G dW^T))``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from solar_edge.format.bundle import Bundle
from solar_edge.runtime.heads import head_from_packet

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float, float]:
    """Accuracy and its 95% Wilson interval."""
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: texts only ``a`` gets right against texts only ``b``
    gets right, each discordant text a fair coin under "a and b are equally accurate"."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Accuracy:
    accuracy: float
    ci95: tuple[float, float]
    correct: int
    n: int

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci95": list(self.ci95), "correct": self.correct,
                "n": self.n}


def _tokenize(bundle: Bundle, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_dir))
    enc = tok(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="np")
    return {k: np.asarray(enc[k], np.int64) for k in ("input_ids", "attention_mask")}


class PatchedEvaluator:
    """Accuracy of ``W0 + dW`` on ``texts`` with the frozen seeded head (one ORT session)."""

    def __init__(self, bundle: Bundle, texts: Sequence[str], labels: Sequence[int],
                 head_seed: int, num_labels: int, *, max_len: int = 64, batch: int = 64,
                 threads: int = 2) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.labels = np.asarray(labels, np.int64)
        hidden = int(bundle.manifest["model"]["hidden_size"])
        self.head = head_from_packet({"labels": [str(i) for i in range(num_labels)],
                                      "head_seed": head_seed}, {}, hidden, lambda name: None)
        enc = _tokenize(bundle, texts, max_len)
        lengths = enc["attention_mask"].sum(1)
        order = np.argsort(lengths, kind="stable")
        self.batches = []
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            width = int(lengths[idx].max())
            self.batches.append((idx, enc["input_ids"][idx, :width],
                                 enc["attention_mask"][idx, :width]))
        self.input_names = [i["name"] for i in bundle.manifest["onnx"]["inputs"]]
        self.base = {layer.id: np.asarray(bundle.base_weight(layer.id)) for layer in bundle.layers}
        self.buffers: dict[int, np.ndarray] = {}
        self._keep = []
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.disable_prepacking", "1")
        for layer in bundle.layers:
            buf = np.array(self.base[layer.id].T, dtype=np.float32, order="C")  # in x out, writable
            ov = ort.OrtValue.ortvalue_from_numpy(buf)
            self._keep.append(ov)
            opts.add_initializer(layer.onnx_initializer, ov)
            self.buffers[layer.id] = buf
        self.session = ort.InferenceSession(str(bundle.onnx_path), opts,
                                            providers=["CPUExecutionProvider"])
        self._opts = opts
        self._checked = False
        self.patched: set[int] = set()
        self.last_predictions = np.zeros(0, np.int64)

    def _feeds(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: feeds[name] for name in self.input_names}

    def patch(self, updates: Mapping[int, np.ndarray]) -> None:
        """Set ``W = W0 + dW`` for the given layers and ``W0`` for every other patched one."""
        for lid in self.patched - set(updates):
            np.copyto(self.buffers[lid], self.base[lid].T)
        for lid, dw in updates.items():
            np.add(self.base[lid].T, np.asarray(dw, np.float32).T, out=self.buffers[lid])
        self.patched = set(updates)

    def predictions(self) -> np.ndarray:
        preds = np.empty(len(self.labels), np.int64)
        for idx, ids, mask in self.batches:
            hidden = self.session.run(None, self._feeds(ids, mask))[0]
            preds[idx] = self.head.logits(hidden, mask).argmax(-1)
        return preds

    def _check_inplace(self) -> None:
        """A fresh session on the same buffers must give the same outputs (edits are seen)."""
        import onnxruntime as ort

        idx, ids, mask = self.batches[0]
        got = self.session.run(None, self._feeds(ids, mask))[0]
        fresh = ort.InferenceSession(str(self.bundle.onnx_path), self._opts,
                                     providers=["CPUExecutionProvider"])
        want = fresh.run(None, self._feeds(ids, mask))[0]
        if not np.allclose(got, want, atol=1e-4):
            raise RuntimeError("onnxruntime did not see in-place weight edits")
        self._checked = True

    def accuracy(self, updates: Mapping[int, np.ndarray]) -> Accuracy:
        self.patch(updates)
        if not self._checked and updates:
            self._check_inplace()
        self.last_predictions = self.predictions()
        correct = int((self.last_predictions == self.labels).sum())
        acc, lo, hi = wilson(correct, len(self.labels))
        return Accuracy(acc, (lo, hi), correct, len(self.labels))
