"""Local training and evaluation loops, shared by clients, the server and the baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedtune.config import TrainConfig
from fedtune.data.sources import Split


@dataclass(frozen=True)
class Encoded:
    """Tokenized examples, unpadded: padding happens per batch."""

    ids: tuple[np.ndarray, ...]  # N x [len_i] token ids, len_i <= max_length
    labels: np.ndarray  # [N]

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    out = tokenizer(list(split.texts), truncation=True, max_length=max_length)
    return Encoded(tuple(np.asarray(x, dtype=np.int64) for x in out["input_ids"]), split.labels)


def collate(enc: Encoded, idx: np.ndarray, pad_id: int) -> dict[str, Tensor]:
    """Pad the chosen examples to the longest among them."""
    rows = [enc.ids[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.from_numpy(r)
        mask[j, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(enc.labels[idx])}


def num_local_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.local_epochs > 0:
        return max(1, math.ceil(cfg.local_epochs * n_examples / cfg.batch_size))
    return cfg.local_steps


def _is_head(name: str) -> bool:
    return "lora_" not in name


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with two groups: the adapter at ``lr``, the (new, randomly initialised) head at
    ``head-lr``. A head that learns as slowly as the adapter is what leaves naive federated
    LoRA far below the centralized ceiling in few rounds."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _is_head(n)], "lr": cfg.lr},
        {"params": [p for n, p in named if _is_head(n)], "lr": cfg.head_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)


def train_local(model: nn.Module, enc: Encoded, cfg: TrainConfig, seed: int, pad_id: int) -> dict[str, float]:
    """Run the local optimisation; returns the mean training loss and the examples seen."""
    if len(enc) == 0:
        raise ValueError("no training examples on this client")
    steps = num_local_steps(cfg, len(enc))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout masks
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    model.train()
    order, pos, losses = rng.permutation(len(enc)), 0, []
    for _ in range(steps):
        if pos + cfg.batch_size > len(order) and pos > 0:
            order, pos = rng.permutation(len(enc)), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        batch = collate(enc, idx, pad_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {"train_loss": float(np.mean(losses)), "steps": float(steps), "examples_seen": float(steps * cfg.batch_size)}


@torch.inference_mode()
def evaluate(model: nn.Module, enc: Encoded, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy; batches are length-sorted to pad little."""
    if len(enc) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num_examples": 0.0}
    model.eval()
    order = np.argsort([len(x) for x in enc.ids], kind="stable")
    loss_sum, correct = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = collate(enc, order[s : s + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, C]
        loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    n = len(enc)
    return {"loss": loss_sum / n, "accuracy": correct / n, "num_examples": float(n)}
