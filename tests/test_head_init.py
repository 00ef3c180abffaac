import torch

from fedtune.head_init import ncm_head


def test_ncm_head_hand_computed():
    # two clients, 2-d features; class 0 at (1, 0), class 1 at (-1, 0), one example each per client
    sums = [torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])]
    counts = [torch.tensor([1.0, 1.0])] * 2
    ss = [torch.zeros(2)] * 2  # one example per (client, class): no spread within a group
    w, b = ncm_head(sums, counts, ss, logit_scale=2.0)
    # mu = 0, sigma = sqrt(sum_g n_g ||m_g - mu||^2 / N) = sqrt(4 / 4) = 1, u_0 = (1, 0), u_1 = (-1, 0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.0], [-2.0, 0.0]]))
    assert torch.allclose(b, torch.zeros(2))


def test_ncm_head_unseen_class_gets_zero_row_and_classifies_centroids():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    x = torch.cat([centers[c] + 0.1 * torch.randn(50, 8, generator=g) for c in (0, 1)])
    y = torch.tensor([0] * 50 + [1] * 50)
    sums = torch.zeros(3, 8).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=3).float()
    means = sums / counts.clamp(min=1)[:, None]
    ss = torch.zeros(3).index_add_(0, y, ((x - means[y]) ** 2).sum(1))
    w, b = ncm_head([sums], [counts], [ss])
    assert torch.equal(w[2], torch.zeros(8))
    assert ((x @ w.T + b).argmax(1) == y).float().mean() == 1.0


def test_ncm_head_stable_for_nearly_constant_features():
    # features with a large common offset and tiny spread: E||x||^2 - ||mu||^2 cancels in float32
    x = 1e3 + 1e-4 * torch.randn(40, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(40) % 2
    sums = torch.zeros(2, 4, dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y).double()
    means = sums / counts[:, None]
    ss = torch.zeros(2, dtype=torch.float64).index_add_(0, y, ((x - means[y]) ** 2).sum(1))
    w, b = ncm_head([sums.float()], [counts.float()], [ss.float()], logit_scale=4.0)
    logits = x.float() @ w.T + b
    assert torch.isfinite(logits).all() and logits.abs().max() < 50
