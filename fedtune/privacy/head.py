"""A differentially private FedNCM head: ``head-init=ncm`` under ``dp=sample``.

FedNCM (Legate et al., 2023) builds the head from per-class feature sums. Under sample-level
DP each client releases, once, before round 1:

    S_c = sum over its class-c examples of x / ||x||  +  N(0, sigma_h^2 I)        # [C, d]

Adding or removing one example moves one row by a unit vector, so the L2 sensitivity is 1
and this is the Gaussian mechanism with noise multiplier sigma_h: one step at sample rate 1
in the client's accountant, composed there with the DP-SGD steps that follow (Mironov,
2017, "Renyi Differential Privacy"; the DP-SGD noise is calibrated for the rest of the
budget). Counts are not released. The pooled sums share a large common direction mu (the
mean unit feature; ``n_local`` is public, as everywhere in fedtune's DP), and the class
direction is the part of S_c orthogonal to mu, which needs no count. With unit features
E||x - mu||^2 = 1 - ||mu||^2 exactly, so the logit scale needs no private statistic either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedtune.privacy.calibrate import Entry, noise_multiplier_for
from fedtune.privacy.config import DPConfig

if TYPE_CHECKING:
    from fedtune.config import RunConfig


def head_sigma(dp: DPConfig, share: float) -> float:
    """sigma_h: the configured noise multiplier, or the smallest one whose release alone
    spends ``share * target_epsilon``."""
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    assert dp.target_epsilon is not None
    return noise_multiplier_for(share * dp.target_epsilon, dp.delta, 1.0, 1, dp.accountant)


def head_plan(cfg: RunConfig) -> tuple[Entry, ...]:
    """What a ``dp=sample`` client releases before training, as accountant entries: the DP
    head when ``head-init=ncm``, else nothing. The DP-SGD noise is calibrated after it."""
    if cfg.privacy.dp != "sample" or cfg.train.head_init != "ncm":
        return ()
    return ((head_sigma(cfg.privacy.sample_dp(), cfg.privacy.dp_head_share), 1.0, 1),)


def unit_class_sums(x: Tensor, y: Tensor, num_labels: int) -> Tensor:
    """Per-class sums of unit-normalised features: x [N, d], y [N] -> [C, d] (float64)."""
    unit = x.to(torch.float64) / x.to(torch.float64).norm(dim=1, keepdim=True).clamp(min=1e-12)  # [N, d]
    return torch.zeros(num_labels, x.shape[1], dtype=torch.float64).index_add_(0, y, unit)


def noisy_class_sums(x: Tensor, y: Tensor, num_labels: int, sigma: float, generator: torch.Generator) -> Tensor:
    """The released statistic: unit class sums + N(0, sigma^2) on every entry. [C, d]"""
    sums = unit_class_sums(x, y, num_labels)
    return sums + sigma * torch.randn(sums.shape, generator=generator, dtype=torch.float64)


def dp_ncm_head(sums: Sequence[Tensor], n_total: float, logit_scale: float = 4.0) -> tuple[Tensor, Tensor]:
    """Released noisy sums (one [C, d] per client) + the public example total ->
    (weight [C, d], bias [C]) of a cosine nearest-class-mean head.

    mu = sum_c S_c / n (the mean unit feature); u_c = the unit direction of S_c with its mu
    component removed; weight = logit_scale * u_c / sqrt(1 - ||mu||^2); bias = -weight @ mu
    (zero up to rounding, since u_c is orthogonal to mu). Pure post-processing."""
    if n_total <= 0:
        raise ValueError("no examples to initialise the head from")
    s = torch.stack([t.to(torch.float64) for t in sums]).sum(0)  # [C, d]
    mu = s.sum(0) / n_total  # [d]
    m2 = float(mu @ mu)
    diff = s - torch.outer(s @ mu, mu) / m2 if m2 > 1e-24 else s  # [C, d], rows orthogonal to mu
    u = diff / diff.norm(dim=1, keepdim=True).clamp(min=1e-12)
    spread = max(1.0 - m2, 1e-6) ** 0.5
    weight = logit_scale * u / spread
    bias = -(weight @ mu)
    return weight.to(torch.float32), bias.to(torch.float32)
