"""Local training and evaluation loops, shared by clients, the server and the baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedtune.catalog import ADAPTERS as ADAPTER_INFO
from fedtune.config import TrainConfig
from fedtune.data.sources import Split
from fedtune.device import placement_of, to_device


@dataclass(frozen=True)
class Encoded:
    """Tokenized examples, unpadded: padding happens per batch."""

    ids: tuple[np.ndarray, ...]  # N x [len_i] token ids, len_i <= max_length
    labels: np.ndarray  # [N]

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, idx: np.ndarray, pad_id: int) -> dict[str, Tensor]:
        return collate(self, idx, pad_id)

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over examples (what DP-SGD clips per example): cross-entropy of [B, C] logits."""
        return nn.functional.cross_entropy(logits, labels)


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    """Token ids of every text, truncated to ``max_length`` (cached on disk when
    $FEDTUNE_TOKEN_CACHE is set: fedtune/data/token_cache.py)."""
    from fedtune.data.token_cache import cached

    def run() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        out = tokenizer(list(split.texts), truncation=True, max_length=max_length)
        return tuple(np.asarray(x, dtype=np.int64) for x in out["input_ids"]), split.labels

    ids, labels = cached(tokenizer, split.texts, split.labels, max_length, run)
    return Encoded(ids, labels)


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


def client_seed(seed: int, server_round: int, client: int) -> int:
    """The seed of one client's local run: differs per round and client, fixed per run seed."""
    return (seed * 1_000_003 + server_round) * 10_007 + client


def num_local_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.local_epochs > 0:
        return max(1, math.ceil(cfg.local_epochs * n_examples / cfg.batch_size))
    return cfg.local_steps


def _is_head(name: str) -> bool:
    return not any(p in name for kind in ADAPTER_INFO.values() for p in kind.params)  # fedtune.catalog


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


class BatchStream:
    """Seeded shuffled batches over an encoding, reshuffled at each pass."""

    def __init__(self, enc: Encoded, batch_size: int, seed: int, pad_id: int) -> None:
        if len(enc) == 0:
            raise ValueError("no training examples on this client")
        self.enc, self.batch_size, self.pad_id = enc, batch_size, pad_id
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(enc)), 0

    def next(self) -> dict[str, Tensor]:
        if self.pos + self.batch_size > len(self.order) and self.pos > 0:
            self.order, self.pos = self.rng.permutation(len(self.enc)), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.enc.collate(idx, self.pad_id)  # the task's own batching (fedtune/tasks.py)


def label_log_prior(labels: np.ndarray, num_labels: int, smoothing: float = 0.0) -> Tensor:
    """[C] log of the label frequencies in ``labels``, mixed with the uniform prior:
    log((1 - smoothing) * freq + smoothing / C). At smoothing 0 a class absent there gets log 1e-6,
    far below the present classes in the local softmax (no gradient: cf. FedRS, Li & Zhan, KDD
    2021); at 1 the offset is constant and the loss is plain cross-entropy."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels).astype(np.float64)
    prior = (1.0 - smoothing) * counts / max(counts.sum(), 1.0) + smoothing / num_labels
    return torch.from_numpy(np.log(np.maximum(prior, 1e-6))).float()


# local-loss -> the offset added to the logits in the training loss (ce: none, the model's own loss)
LOGIT_OFFSETS = {
    "logit-adjusted": label_log_prior,  # Menon et al., ICLR 2021; FedLC (Zhang et al., ICML 2022)
}


def logit_offset(cfg: TrainConfig, model: nn.Module, enc) -> Tensor | None:
    """What ``local-loss`` adds to the [B, C] logits of ``model`` while it trains on the class
    labels of ``enc`` (None for ce: the model's own loss)."""
    if cfg.local_loss == "ce":
        return None
    return LOGIT_OFFSETS[cfg.local_loss](enc.labels, model.config.num_labels, cfg.prior_smoothing)


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, sched, batches: BatchStream, steps: int,
              offset: Tensor | None = None, proximal_mu: float = 0.0) -> list[float]:
    """``steps`` optimizer steps; returns the per-step losses. ``offset`` [C]: the loss is the
    cross-entropy of logits + offset (a logit-adjusted loss) instead of the model's own.
    ``proximal_mu`` > 0 adds mu/2 * ||w - w_start||^2 over the trainable weights (FedProx: Li et
    al., MLSys 2020; w_start = the weights this local run began from, the global model)."""
    model.train()  # also what makes transformers apply gradient checkpointing
    where = placement_of(model)
    offset = None if offset is None else offset.to(where.device)
    anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad] if proximal_mu > 0 else []
    losses: list[Tensor] = []
    for _ in range(steps):
        batch = to_device(batches.next(), where.device)
        with where.compute():  # autocast of the frozen base, if any (fedtune/device.py)
            if offset is None:
                loss = model(**batch).loss
            else:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [B, C]
                loss = Encoded.loss(logits.float() + offset, batch["labels"])
        if anchor:
            loss = loss + 0.5 * proximal_mu * sum(((p.float() - a.float()) ** 2).sum() for p, a in anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())  # read once at the end: no device sync per step
    return torch.stack(losses).tolist() if losses else []


def warmup(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (steps + 1)))


def train_local(model: nn.Module, enc: Encoded, cfg: TrainConfig, seed: int, pad_id: int) -> dict[str, float]:
    """One client's local run with a fresh optimizer: mean training loss and steps taken."""
    steps = num_local_steps(cfg, len(enc))
    torch.manual_seed(seed)  # dropout masks
    opt = make_optimizer(model, cfg)
    losses = run_steps(model, opt, warmup(opt, cfg.warmup_steps), BatchStream(enc, cfg.batch_size, seed, pad_id), steps,
                       logit_offset(cfg, model, enc), cfg.proximal_mu)
    return {"train_loss": float(np.mean(losses)), "steps": float(steps)}


@torch.inference_mode()
def evaluate(model: nn.Module, enc: Encoded, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy; batches are length-sorted to pad little."""
    if len(enc) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num_examples": 0.0}
    model.eval()
    where = placement_of(model)
    order = np.argsort([len(x) for x in enc.ids], kind="stable")
    loss_sum, correct = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = to_device(collate(enc, order[s : s + batch_size], pad_id), where.device)
        with where.compute():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, C]
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    n = len(enc)
    return {"loss": loss_sum / n, "accuracy": correct / n, "num_examples": float(n)}
