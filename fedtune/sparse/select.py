"""Which entries of each targeted weight a client trains: one registry of selection rules.

- ``magnitude`` (SpIEL, Ansell et al., 2024): the entries with the largest gradient magnitude
  accumulated over ``sparse-warmup`` local batches; with ``sparse-keep`` > 0, prune-and-regrow
  between rounds: that share of the k entries is kept from the largest |global delta| and the
  rest regrows by gradient;
- ``random`` (PaCA, Woo et al., 2025): fixed random entries from the run's seed, shared with
  the server, so no indices cross the wire; lower densities are prefixes of one seeded
  permutation, so clients of different densities share their entries;
- ``ks`` (KS-Lottery, Yuan et al., 2024): after ``sparse-warmup`` steps of dense training of
  the targeted weights, the rows (output units) whose value distribution shifted most by the
  two-sample Kolmogorov-Smirnov statistic; all entries of the chosen rows train.

A rule is ``select(ctx) -> {layer: idx}`` with idx int64, sorted, unique, in [0, numel).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtune.registry import Registry
from fedtune.sparse.layer import SparseLinear


@dataclass
class SelectContext:
    model: nn.Module
    layers: dict[str, SparseLinear]  # {layer path: module}
    density: float
    batches: Callable[[], dict[str, Tensor]]  # the next local batch
    warmup: int  # batches (magnitude) or steps (ks)
    keep: float  # magnitude: share of k kept by |global delta| (prune-and-regrow)
    seed: int  # the run's seed (random)
    lr: float  # ks warm-up learning rate
    w0: dict[str, Tensor]  # {layer: the weight as built} (magnitude with keep > 0)


SELECTIONS: Registry[Callable[[SelectContext], dict[str, Tensor]]] = Registry("sparse selection")


def num_entries(density: float, numel: int) -> int:
    """k = round(density * numel), at least 1."""
    return max(1, min(numel, round(density * numel)))


def random_mask(seed: int, layer: str, numel: int, k: int) -> Tensor:
    """The first k of a permutation of range(numel) seeded by (seed, layer), sorted: [k] int64."""
    digest = hashlib.sha256(f"{seed}/{layer}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(numel, generator=gen)[:k].sort().values


def top_k(score: Tensor, k: int) -> Tensor:
    """Flat indices of the k largest scores, sorted: [k] int64."""
    return torch.topk(score.flatten(), k).indices.sort().values


def ks_statistic(before: Tensor, after: Tensor) -> Tensor:
    """Two-sample KS statistic per row: sup_x |F_before(x) - F_after(x)|. [R, n] x [R, n] -> [R]."""
    a, b = before.sort(dim=1).values, after.sort(dim=1).values  # [R, n]
    points = torch.cat([a, b], dim=1)  # [R, 2n]: the sup is attained at a sample point
    n = a.shape[1]
    fa = torch.searchsorted(a.contiguous(), points.contiguous(), right=True) / n
    fb = torch.searchsorted(b.contiguous(), points.contiguous(), right=True) / n
    return (fa - fb).abs().max(dim=1).values


@SELECTIONS.register("random")
def _random(ctx: SelectContext) -> dict[str, Tensor]:
    return {name: random_mask(ctx.seed, name, m.base_layer.weight.numel(),
                              num_entries(ctx.density, m.base_layer.weight.numel()))
            for name, m in ctx.layers.items()}


@contextlib.contextmanager
def _dense_grads(ctx: SelectContext) -> Iterator[None]:
    """Enable gradients on the targeted base weights for the duration of the block."""
    weights = [m.base_layer.weight for m in ctx.layers.values()]
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None


@SELECTIONS.register("magnitude")
def _magnitude(ctx: SelectContext) -> dict[str, Tensor]:
    acc = {name: torch.zeros_like(m.base_layer.weight) for name, m in ctx.layers.items()}
    with _dense_grads(ctx):
        ctx.model.train()
        for _ in range(max(1, ctx.warmup)):
            ctx.model.zero_grad(set_to_none=True)
            ctx.model(**ctx.batches()).loss.backward()
            for name, m in ctx.layers.items():
                acc[name] += m.base_layer.weight.grad.abs()
    out = {}
    for name, m in ctx.layers.items():
        w = m.base_layer.weight
        k = num_entries(ctx.density, w.numel())
        kept = torch.empty(0, dtype=torch.long, device=w.device)
        if ctx.keep > 0 and name in ctx.w0:
            delta = (w.detach() - ctx.w0[name]).abs().flatten()
            n_keep = min(int(ctx.keep * k), int((delta > 0).sum()))
            kept = torch.topk(delta, n_keep).indices if n_keep else kept
        score = acc[name].flatten().clone()
        score[kept] = -1.0  # regrow among the others
        grown = torch.topk(score, k - len(kept)).indices
        out[name] = torch.cat([kept, grown]).sort().values
    return out


@SELECTIONS.register("ks")
def _ks(ctx: SelectContext) -> dict[str, Tensor]:
    before = {name: m.base_layer.weight.detach().clone() for name, m in ctx.layers.items()}
    weights = [m.base_layer.weight for m in ctx.layers.values()]
    try:
        with _dense_grads(ctx):
            opt = torch.optim.Adam(weights, lr=ctx.lr)
            ctx.model.train()
            for _ in range(max(1, ctx.warmup)):
                opt.zero_grad(set_to_none=True)
                ctx.model(**ctx.batches()).loss.backward()
                opt.step()
        out = {}
        for name, w in zip(ctx.layers, weights):
            stat = ks_statistic(before[name], w.detach())  # [d_out]
            rows = max(1, round(num_entries(ctx.density, w.numel()) / w.shape[1]))
            chosen = torch.topk(stat, min(rows, w.shape[0])).indices.sort().values  # [rows]
            out[name] = (chosen[:, None] * w.shape[1] + torch.arange(w.shape[1], device=w.device)).flatten()
        return out
    finally:
        with torch.no_grad():
            for name, w in zip(ctx.layers, weights):
                w.copy_(before[name])  # the warm-up only chooses; training starts from the global model
