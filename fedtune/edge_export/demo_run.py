"""A run directory in a few steps, without a federation: for edge benchmarks and tests.

The adapter is trained centrally on a seeded slice of the training split, then written
exactly as ``fedtune simulate`` writes its global adapter, so ``fedtune export`` cannot
tell the difference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtune.config import RunConfig
from fedtune.data import load_dataset
from fedtune.evaluation import TestEvaluator
from fedtune.modeling import build_model, load_tokenizer
from fedtune.artifacts import RunDir
from fedtune.training import encode, train_local


def demo_model(cfg: RunConfig, steps: int, train_examples: int = 4000) -> nn.Module:
    """``cfg``'s model with its adapter trained ``steps`` centralized steps."""
    ds = load_dataset(cfg.data)
    rng = np.random.default_rng(cfg.federation.seed)
    idx = rng.choice(len(ds.train), min(train_examples, len(ds.train)), replace=False)
    tok = load_tokenizer(cfg.model.model)
    enc = encode(tok, ds.train.subset(idx), cfg.data.max_length)
    model = build_model(dataclasses.replace(cfg.model, device="cpu"), ds.num_labels, seed=cfg.federation.seed)
    train_cfg = dataclasses.replace(cfg.train, local_steps=steps, local_epochs=0.0)
    train_local(model, enc, train_cfg, cfg.federation.seed, tok.pad_token_id or 0)
    return model.eval()


def perturb_adapter(model: nn.Module, std: float, seed: int = 0) -> None:
    """Random values for every trainable matrix (LoRA A/B, head weight; LoRA B is zero at
    init): merging then changes the weights, and an untrained model's predictions vary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def save_demo_run(cfg: RunConfig, model: nn.Module, out: str | Path) -> RunDir:
    """Write ``model``'s adapter as a run directory (config, adapter, labels, summary)."""
    ds = load_dataset(cfg.data)
    run = RunDir(out).create(cfg, {"demo": True})
    accuracy = TestEvaluator(cfg)(model)["accuracy"]
    adapter = run.save_adapter(model, ds.label_names)
    run.write_summary({"final_accuracy": accuracy, "rounds": 0, "adapter": str(adapter), "demo": True})
    return run


def train_demo_run(cfg: RunConfig, out: str | Path, steps: int) -> RunDir:
    return save_demo_run(cfg, demo_model(cfg, steps), out)
