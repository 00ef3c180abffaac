"""Federated head initialisation before round 1, one registry entry per ``head-init``.

- ``ncm``: class centroids (FedNCM, Legate et al., 2023, "Guiding the Last Layer in Federated
  Learning with Pre-Trained Models"). Each client sends, per class, the sum and count of the
  features its frozen model feeds the classification head (C x d floats + C counts); the
  server turns the pooled centroids into a cosine nearest-class-mean head.
- ``ridge``: the exact closed-form head (Fed3R, Fani et al., 2024, "Accelerating
  Heterogeneous Federated Learning with Closed-form Classifiers"). Clients add their feature
  scatter (d x d) to the sums and counts; these sufficient statistics add up exactly across
  clients, so the server's shrinkage-LDA head equals the one fitted on the pooled data,
  whatever the label skew.

Either way federated fine-tuning starts from a head that already separates the classes
instead of a random one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedtune.device import placement_of, to_device
from fedtune.config import TrainConfig
from fedtune.registry import Registry
from fedtune.training import Encoded, collate


def head_module(model: nn.Module) -> nn.Linear:
    """The trainable linear head (peft keeps it as modules_to_save['default'])."""
    heads = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("modules_to_save.default")]
    if len(heads) != 1:
        raise ValueError(f"expected one trainable head, found {len(heads)}")
    return heads[0]


@torch.inference_mode()
def head_features(model: nn.Module, enc: Encoded, batch_size: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(x [N, d] float64, y [N]): the features the frozen model feeds its head, and the labels."""
    head = head_module(model)
    feats: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
    model.eval()
    where = placement_of(model)
    try:
        for s in range(0, len(enc), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(enc))).numpy()
            b = to_device(collate(enc, idx, pad_id), where.device)
            with where.compute():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        hook.remove()
    x = torch.cat(feats).to("cpu", torch.float64) if feats else torch.zeros(0, head.in_features, dtype=torch.float64)
    return x, torch.as_tensor(enc.labels, dtype=torch.long)


def class_feature_sums(
    model: nn.Module, enc: Encoded, num_labels: int, batch_size: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(sums [C, d], counts [C], ss [C]) of the head's input features, where ss_c is the sum
    of squared distances to this client's own class-c mean (stable to combine, unlike E||x||^2)."""
    x, y = head_features(model, enc, batch_size, pad_id)  # [N, d], [N]
    sums = torch.zeros(num_labels, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_labels).to(torch.float64)
    means = sums / counts.clamp(min=1)[:, None]  # [C, d]
    ss = torch.zeros(num_labels, dtype=torch.float64).index_add_(0, y, ((x - means[y]) ** 2).sum(1))
    return sums, counts, ss


def ncm_head(
    sums: Sequence[Tensor], counts: Sequence[Tensor], ss: Sequence[Tensor], logit_scale: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Pooled statistics -> (weight [C, d], bias [C]) of a nearest-class-mean head.

    logits_c = logit_scale * <u_c, x - mu> / sigma, with u_c the unit direction of
    centroid_c - mu, mu the pooled mean feature and sigma = sqrt(E||x - mu||^2) the features'
    spread (combined from per-client, per-class sums of squares as in Chan et al., 1979; never
    below the farthest centroid's distance), so logits stay O(logit_scale) whatever the
    feature scale. Classes no client holds get a zero row.
    """
    total = torch.stack(list(sums)).to(torch.float64).sum(0)  # [C, d]
    n = torch.stack(list(counts)).to(torch.float64).sum(0)  # [C]
    if float(n.sum()) <= 0:
        raise ValueError("no examples to initialise the head from")
    seen = n > 0
    mu = total.sum(0) / n.sum()  # [d]
    centroids = torch.where(seen[:, None], total / n.clamp(min=1)[:, None], mu)  # [C, d]
    diff = centroids - mu
    norms = diff.norm(dim=1, keepdim=True)  # [C, 1]
    # sum of squares about mu = within each (client, class) group + n_g ||mean_g - mu||^2
    total_ss = sum(float(x.to(torch.float64).sum()) for x in ss)
    for s_i, n_i in zip(sums, counts):
        s_i, n_i = s_i.to(torch.float64), n_i.to(torch.float64)
        has = n_i > 0
        total_ss += float((n_i[has] * ((s_i[has] / n_i[has, None] - mu) ** 2).sum(1)).sum())
    sigma = max((total_ss / float(n.sum())) ** 0.5, float(norms.max()), 1e-12)
    u = torch.where(norms > 1e-12, diff / norms.clamp(min=1e-12), torch.zeros_like(diff))
    weight = logit_scale * u / sigma
    bias = -(weight @ mu)
    return weight.to(torch.float32), bias.to(torch.float32)


def set_head(model: nn.Module, weight: Tensor, bias: Tensor) -> None:
    head = head_module(model)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


# -- head-init=ridge: the exact closed-form head (Fed3R; shrinkage LDA) ---------------------


def feature_moments(x: Tensor, y: Tensor, num_labels: int) -> tuple[Tensor, Tensor, Tensor]:
    """One client's sufficient statistics of a linear discriminant, all float64:
    (sums [C, d], counts [C], scatter [d, d]) with scatter = sum_i (x_i - xbar)(x_i - xbar)^T
    about this client's own mean xbar. Centred locally so that pooling (Chan et al., 1979)
    never subtracts two large second moments (float32 on the wire stays exact enough)."""
    x = x.to(torch.float64)
    sums = torch.zeros(num_labels, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_labels).to(torch.float64)
    xc = x - x.mean(0) if len(x) else x
    return sums, counts, xc.T @ xc


def class_feature_moments(
    model: nn.Module, enc: Encoded, num_labels: int, batch_size: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`feature_moments` of the head's input features on ``enc``."""
    x, y = head_features(model, enc, batch_size, pad_id)
    return feature_moments(x, y, num_labels)


def pooled_moments(
    sums: Sequence[Tensor], counts: Sequence[Tensor], scatters: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clients' statistics -> (class means [C, d], class counts [C], pooled mean [d],
    within-class scatter [d, d]): exactly what the pooled data would give, whatever the split.

    total scatter T = sum_k (S_k + n_k (xbar_k - mu)(xbar_k - mu)^T); within-class
    W = T - sum_c n_c (m_c - mu)(m_c - mu)^T (classes no client holds: mean mu, count 0)."""
    s = [t.to(torch.float64) for t in sums]
    c = [t.to(torch.float64) for t in counts]
    total, n = torch.stack(s).sum(0), torch.stack(c).sum(0)  # [C, d], [C]
    big_n = float(n.sum())
    if big_n <= 0:
        raise ValueError("no examples to initialise the head from")
    mu = total.sum(0) / big_n
    scatter = sum(t.to(torch.float64) for t in scatters)
    for s_k, c_k in zip(s, c):
        n_k = float(c_k.sum())
        if n_k > 0:
            dk = s_k.sum(0) / n_k - mu
            scatter = scatter + n_k * torch.outer(dk, dk)
    means = torch.where((n > 0)[:, None], total / n.clamp(min=1)[:, None], mu)
    dc = means - mu  # [C, d]
    within = scatter - (dc * n[:, None]).T @ dc
    return means, n, mu, (within + within.T) / 2


def oas_shrinkage(cov: Tensor, n: float) -> float:
    """Oracle Approximating Shrinkage (Chen et al., 2010, in scikit-learn's form): the weight g
    of the scaled identity in (1 - g) cov + g tr(cov)/d I, from the covariance alone
    (Ledoit-Wolf's estimate needs per-example fourth moments, which no client sends)."""
    d = cov.shape[0]
    mu, alpha = float(torch.trace(cov)) / d, float((cov * cov).mean())
    den = (n + 1.0) * (alpha - mu * mu / d)
    return 1.0 if den <= 0 else min(1.0, (alpha + mu * mu) / den)


def ridge_head(
    sums: Sequence[Tensor], counts: Sequence[Tensor], scatters: Sequence[Tensor],
    shrinkage: float | None = None, logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, float]:
    """Pooled statistics -> (weight [C, d], bias [C], g) of a shrinkage-LDA head (float64). Fed3R
    (Fani et al., 2024) aggregates the same second moment and fits ridge regression to one-hot
    targets; LDA (the covariance ridge-regularised toward a scaled identity) adds class priors
    and log-posterior logits, which fine-tuning then starts from:

        logits_c(x) = logit_scale * ((m_c - mu)^T P (x - mu) - 1/2 (m_c - mu)^T P (m_c - mu) + log pi_c)

    P the inverse of Sigma = (1 - g) W / N + g tr(W / N) / d I: the pooled within-class
    covariance (maximum likelihood, as scikit-learn's LDA) shrunk toward a scaled identity;
    pi_c = n_c / N. At ``logit_scale=1`` this is the Gaussian-LDA log posterior up to a term
    shared by all classes. ``shrinkage`` g in [0, 1]; None = OAS (:func:`oas_shrinkage`).
    Classes no client holds get a zero row and the prior of half an example."""
    means, n, mu, within = pooled_moments(sums, counts, scatters)
    seen = n > 0
    big_n = float(n.sum())
    cov = within / big_n
    g = oas_shrinkage(cov, big_n) if shrinkage is None else float(shrinkage)
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {g}")
    d = cov.shape[0]
    target = max(float(torch.trace(cov)) / d, 1e-12)
    sigma = (1.0 - g) * cov + g * target * torch.eye(d, dtype=torch.float64)
    dc = torch.where(seen[:, None], means - mu, torch.zeros_like(means))  # [C, d]
    eig = torch.linalg.eigvalsh(sigma)  # ascending
    if float(eig[0]) <= 1e-10 * max(float(eig[-1]), 1e-300):
        raise ValueError(f"the shrunk covariance is singular at shrinkage {g:g} ({int(big_n)} examples, "
                         f"{d} features): set head-shrinkage above 0 (or leave it unset: OAS)")
    weight = torch.linalg.solve(sigma, dc.T).T  # [C, d]: rows P (m_c - mu)
    prior = torch.where(seen, n, torch.full_like(n, 0.5)) / big_n
    bias = -0.5 * (weight * dc).sum(1) + prior.log() - weight @ mu
    return logit_scale * weight, logit_scale * bias, g


# -- the registry: what a client sends, and how the server builds the head from it -----------

Stats = Callable[[nn.Module, Encoded, int, int, int], dict[str, Tensor]]  # (model, enc, C, batch, pad)
Build = Callable[[list[dict[str, Tensor]], TrainConfig], tuple[Tensor, Tensor]]  # replies -> (weight, bias)


@dataclass(frozen=True)
class HeadInit:
    stats: Stats  # on the client: float64 statistics of its own examples
    build: Build  # on the server: the pooled head


HEAD_INITS: Registry[HeadInit] = Registry("head-init")  # head-init=random: no entry, no query


def _ncm_stats(model: nn.Module, enc: Encoded, num_labels: int, batch_size: int, pad_id: int) -> dict[str, Tensor]:
    sums, counts, ss = class_feature_sums(model, enc, num_labels, batch_size, pad_id)
    return {"sums": sums, "counts": counts, "ss": ss}


def _ncm_build(parts: list[dict[str, Tensor]], cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    return ncm_head([p["sums"] for p in parts], [p["counts"] for p in parts], [p["ss"] for p in parts],
                    cfg.head_logit_scale)


def _ridge_stats(model: nn.Module, enc: Encoded, num_labels: int, batch_size: int, pad_id: int) -> dict[str, Tensor]:
    sums, counts, scatter = class_feature_moments(model, enc, num_labels, batch_size, pad_id)
    return {"sums": sums, "counts": counts, "scatter": scatter}


def _ridge_build(parts: list[dict[str, Tensor]], cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    weight, bias, _ = ridge_head([p["sums"] for p in parts], [p["counts"] for p in parts],
                                 [p["scatter"] for p in parts], cfg.head_shrinkage, cfg.head_ridge_scale)
    return weight.float(), bias.float()


HEAD_INITS.register("ncm")(HeadInit(_ncm_stats, _ncm_build))
HEAD_INITS.register("ridge")(HeadInit(_ridge_stats, _ridge_build))


def client_head_stats(model: nn.Module, enc: Encoded, cfg: TrainConfig, pad_id: int) -> tuple[dict[str, Tensor], int]:
    """(what this client sends for ``cfg.head_init``, as float32; examples used): on the first
    ``head-init-examples`` of its examples (the local order is already a seeded shuffle)."""
    n = min(len(enc), cfg.head_init_examples)
    sub = Encoded(enc.ids[:n], enc.labels[:n])
    build_stats = HEAD_INITS.get(cfg.head_init).stats
    stats = build_stats(model, sub, head_module(model).out_features, cfg.eval_batch_size, pad_id)
    return {k: v.float() for k, v in stats.items()}, n


def clients_head(model: nn.Module, encs: Sequence[Encoded], cfg: TrainConfig, pad_id: int) -> int:
    """Build ``head-init``'s head into ``model`` from what each client of ``encs`` (its training
    rows, in its local order) answers the head_init query: the federation's round-0 head
    without the wire (for ``ridge`` the exact closed form; ``clients_head`` and the server build
    the same head). Returns the examples used."""
    answers = [client_head_stats(model, enc, cfg, pad_id) for enc in encs]
    set_head(model, *HEAD_INITS.get(cfg.head_init).build([stats for stats, _ in answers], cfg))
    return sum(n for _, n in answers)
