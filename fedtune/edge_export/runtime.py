"""The device-side classifier: onnxruntime + tokenizers + numpy only.

Importing this module must never pull in torch or transformers: a device has only the
packages of the ``edge`` extra (see docs/edge.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedtune.edge_export.errors import EdgeRuntimeError
from fedtune.edge_export.layout import INPUT_NAMES, LABELS, MODEL_FP32, MODEL_INT8, TOKENIZER

Prediction = tuple[str, float]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def read_labels(path: Path) -> list[str]:
    if not path.is_file():
        raise EdgeRuntimeError(f"no {path.name} in {path.parent}")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeRuntimeError(f"cannot read {path}: {_first_line(exc)}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise EdgeRuntimeError(f"{path} must be a non-empty JSON list of label names")
    return labels


def read_tokenizer(path: Path):
    """The exported tokenizer.json; truncation and padding are configured in the file."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise EdgeRuntimeError(f"no {path.name} in {path.parent}: the tokenizer is missing, re-export the folder")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise EdgeRuntimeError(f"cannot load the tokenizer {path}: {_first_line(exc)}") from None
    if tok.padding is None or tok.truncation is None:
        raise EdgeRuntimeError(f"{path} sets no padding/truncation; re-export the folder")
    return tok


def open_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session; a missing or unreadable model is a user error."""
    import onnxruntime as ort

    if not path.is_file():
        hint = " (export with --int8)" if path.name == MODEL_INT8 else ""
        raise EdgeRuntimeError(f"no {path.name} in {path.parent}{hint}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # InvalidProtobuf, Fail, ...: all mean an unusable file
        why = _first_line(exc).rpartition("failed:")[2].strip() or "unreadable"
        raise EdgeRuntimeError(f"cannot load the model {path}: {why}") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _texts(texts: Sequence[str] | str) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise EdgeRuntimeError("no input text given")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise EdgeRuntimeError(f"input text {i + 1} is empty")
    return texts


def encode(tokenizer, texts: Sequence[str] | str) -> dict[str, np.ndarray]:
    """Token ids and attention mask, [B, T] int64, padded to the longest text in the batch."""
    encs = tokenizer.encode_batch(_texts(texts))
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    return {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}


class EdgeClassifier:
    """``EdgeClassifier(folder).predict(["text", ...]) -> [(label, probability), ...]``."""

    def __init__(self, folder: str | Path, model_file: str = MODEL_FP32, threads: int | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EdgeRuntimeError(f"export folder not found: {self.folder}")
        self.labels = read_labels(self.folder / LABELS)
        self.tokenizer = read_tokenizer(self.folder / TOKENIZER)
        self.session = open_session(self.folder / model_file, threads)
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise EdgeRuntimeError(f"{model_file} takes inputs {names}, expected {INPUT_NAMES}")

    @classmethod
    def int8(cls, folder: str | Path, threads: int | None = None) -> EdgeClassifier:
        return cls(folder, MODEL_INT8, threads)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return encode(self.tokenizer, texts)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Logits [B, C] for already-encoded inputs."""
        return self.session.run(None, feed)[0]

    def logits(self, texts: Sequence[str] | str, batch_size: int = 32) -> np.ndarray:
        """Logits [N, C], computed ``batch_size`` texts at a time."""
        texts = _texts(texts)
        parts = [self.run(self.encode(texts[s : s + batch_size])) for s in range(0, len(texts), batch_size)]
        return np.concatenate(parts, axis=0)

    def predict(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[Prediction]:
        """The most likely label of each text and its softmax probability."""
        probs = softmax(self.logits(texts, batch_size))
        if probs.shape[-1] != len(self.labels):
            raise EdgeRuntimeError(f"the model has {probs.shape[-1]} outputs but labels.json names {len(self.labels)}")
        best = probs.argmax(axis=-1)
        return [(self.labels[k], float(probs[i, k])) for i, k in enumerate(best)]
