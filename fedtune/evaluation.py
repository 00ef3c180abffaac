"""Server-side (centralized) evaluation on a fixed slice of the held-out test split."""

from __future__ import annotations

import numpy as np
from torch import nn

from fedtune.config import RunConfig
from fedtune.data import load_dataset
from fedtune.bases import load_tokenizer
from fedtune.training import Encoded, encode, evaluate

EVAL_SUBSET_SEED = 12345  # the same test slice for every run, whatever its seed


def test_encoding(cfg: RunConfig) -> Encoded:
    ds = load_dataset(cfg.data)
    test = ds.test
    if cfg.data.eval_size and cfg.data.eval_size < len(test):
        idx = np.sort(np.random.default_rng(EVAL_SUBSET_SEED).choice(len(test), cfg.data.eval_size, replace=False))
        test = test.subset(idx)
    return encode(load_tokenizer(cfg.model.model), test, cfg.data.max_length)


class TestEvaluator:
    def __init__(self, cfg: RunConfig) -> None:
        self.enc = test_encoding(cfg)
        self.batch_size = cfg.train.eval_batch_size
        self.pad_id = load_tokenizer(cfg.model.model).pad_token_id or 0

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.enc, self.batch_size, self.pad_id)
