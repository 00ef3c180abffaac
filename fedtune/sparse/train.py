"""A client's local run with a sparse adapter: choose the entries, train only them.

The chosen entries start from zero on top of the global model (base = W0 + global delta),
so the trained values *are* the client's update: ``{base-delta/<layer>: (idx, values)}``,
left on the model as ``last_update`` for the reply's encoding (fedtune.compression.client).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtune import wire
from fedtune.adapters import _W0  # the weights as built, recorded by set_base (prune-and-regrow)
from fedtune.config import RunConfig
from fedtune.device import placement_of, to_device
from fedtune.sparse.layer import sparse_layers
from fedtune.sparse.select import SELECTIONS, SelectContext
from fedtune.training import BatchStream, Encoded, logit_offset, make_optimizer, num_local_steps, run_steps, warmup


def choose(model: nn.Module, cfg: RunConfig, batches: BatchStream) -> dict:
    """{layer: idx} by the configured selection rule."""
    layers = sparse_layers(model)
    w0 = {n: w for n, w in _W0.get(model, {}).items() if n in layers}
    device = placement_of(model).device
    ctx = SelectContext(model, layers, cfg.model.sparse_density, lambda: to_device(batches.next(), device),
                        cfg.model.sparse_warmup, cfg.model.sparse_keep, cfg.federation.seed, cfg.train.lr, w0)
    return SELECTIONS.get(cfg.model.sparse_selection)(ctx)


def train_sparse(model: nn.Module, enc: Encoded, cfg: RunConfig, seed: int, pad_id: int) -> dict[str, float]:
    """Select, then ``local-steps`` AdamW steps on the chosen values (``lr``) and the head
    (``head-lr``); the optimizer holds state for the k chosen entries only."""
    torch.manual_seed(seed)  # dropout masks
    batches = BatchStream(enc, cfg.train.batch_size, seed, pad_id)
    masks = choose(model, cfg, batches)
    layers = sparse_layers(model)
    try:
        for n, m in layers.items():
            m.start(masks[n])
        opt = make_optimizer(model, cfg.train)  # the k values per layer at lr, the head at head-lr
        steps = num_local_steps(cfg.train, len(enc))
        losses = run_steps(model, opt, warmup(opt, cfg.train.warmup_steps), batches, steps,
                           logit_offset(cfg.train, model, enc), cfg.train.proximal_mu)
    finally:
        update = {wire.BASE + n: m.stop() for n, m in layers.items()}
    model.last_update = update
    entries = sum(len(idx) for idx, _ in update.values())
    return {"train_loss": float(np.mean(losses)), "steps": float(steps), "sparse_entries": float(entries)}


def train_sparse_dp(worker, cfg: RunConfig, seed: int, context, client: int) -> dict[str, float]:
    """DP-SGD on the seeded ``random`` entries (data-independent, so the choice leaks nothing;
    fedtune.privacy.rules refuses the data-dependent rules under dp=sample). Per-example
    gradients of ``values`` come from the grad sampler registered in fedtune.sparse.dp."""
    from fedtune.privacy.client import train_sample_dp
    from fedtune.sparse import dp  # noqa: F401 - registers SparseLinear's opacus grad sampler

    layers = sparse_layers(worker.model)
    masks = choose(worker.model, cfg, BatchStream(worker.data.train, cfg.train.batch_size, seed, worker.pad_id))
    try:
        for n, m in layers.items():
            m.start(masks[n])
        stats = train_sample_dp(worker, cfg, seed, context, client)
    finally:
        worker.model.last_update = {wire.BASE + n: m.stop() for n, m in layers.items()}
    return stats


def train_sparse_client(worker, cfg: RunConfig, seed: int, context, client: int) -> dict[str, float]:
    """The ClientApp's entry point for ``adapter=sparse`` (plain, or DP-SGD with dp=sample)."""
    if cfg.privacy.dp == "sample":
        return train_sparse_dp(worker, cfg, seed, context, client)
    return train_sparse(worker.model, worker.data.train, cfg, seed, worker.pad_id)
