"""ONNX vs torch on held-out test texts: logit differences, argmax agreement, accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedtune.config import RunConfig
from fedtune.data import load_dataset
from fedtune.edge_export.runtime import encode
from fedtune.evaluation import EVAL_SUBSET_SEED

Feed = dict[str, np.ndarray]


def sample_texts(cfg: RunConfig, n: int) -> tuple[list[str], np.ndarray]:
    """``n`` seeded test examples (texts, label ids): the same ones for every export."""
    test = load_dataset(cfg.data).test
    idx = np.random.default_rng(EVAL_SUBSET_SEED).permutation(len(test))[: min(n, len(test))]
    return [test.texts[i] for i in idx], test.labels[idx]


def encode_batches(tokenizer, texts: Sequence[str], batch_size: int) -> list[Feed]:
    """Consecutive batches, each padded to its longest text (so masks really are exercised)."""
    return [encode(tokenizer, texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]


def torch_runner(module: nn.Module) -> Callable[[Feed], np.ndarray]:
    def run(feed: Feed) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(v) for v in feed.values())).numpy()

    return run


def ort_runner(session) -> Callable[[Feed], np.ndarray]:
    return lambda feed: session.run(None, feed)[0]


def logits(run: Callable[[Feed], np.ndarray], batches: list[Feed]) -> np.ndarray:
    return np.concatenate([run(b) for b in batches], axis=0).astype(np.float64)  # [N, C]


def compare(reference: np.ndarray, got: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How far ``got`` is from the torch ``reference`` logits, and its accuracy."""
    diff = np.abs(reference - got)
    return {
        "max_abs_diff": float(diff.max()),
        "logit_scale": logit_scale(reference),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float((reference.argmax(-1) == got.argmax(-1)).mean()),
        "accuracy": accuracy(got, labels),
    }


def logit_scale(reference: np.ndarray) -> float:
    """max(1, the largest |logit| of the reference): fp32 round-off grows with the logits' size."""
    return max(1.0, float(np.abs(reference).max())) if reference.size else 1.0


def within_tolerance(max_abs_diff: float, scale: float, rtol: float) -> bool:
    """The parity gate: |dlogit| <= rtol x max(1, largest |logit|); False for NaN."""
    return bool(max_abs_diff <= rtol * scale)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(-1) == labels).mean())
