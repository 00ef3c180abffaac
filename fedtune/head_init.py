"""Federated head initialisation from class centroids (FedNCM, Legate et al., 2023,
"Guiding the Last Layer in Federated Learning with Pre-Trained Models").

Before round 1 each client sends, per class, the sum and count of the features its frozen
model feeds the classification head (C x d floats + C counts, one message). The server turns
the pooled centroids into a cosine nearest-class-mean head, so federated fine-tuning starts
from a head that already separates the classes instead of a random one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedtune.device import placement_of, to_device
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
