import numpy as np
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


# -- head-init=ridge: the federated shrinkage-LDA head equals the centralized closed form ---

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedtune.head_init import feature_moments, oas_shrinkage, pooled_moments, ridge_head  # noqa: E402


def _skewed_clients(seed=0, n=600, d=7, classes=6, clients=5, alpha=0.1, offset=0.0):
    """Gaussian classes split over clients with Dirichlet(alpha) label skew (Hsu et al., 2019)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 2
    mix = rng.normal(size=(d, d))
    y = rng.integers(0, classes, n)
    x = offset + centers[y] + rng.normal(size=(n, d)) @ mix
    owner = np.empty(n, dtype=int)
    for c in range(classes):
        idx = np.flatnonzero(y == c)
        share = rng.dirichlet([alpha] * clients)
        owner[idx] = rng.choice(clients, len(idx), p=share)
    parts = [(torch.as_tensor(x[owner == k]), torch.as_tensor(y[owner == k])) for k in range(clients)]
    return torch.as_tensor(x), torch.as_tensor(y), parts


def _centralized_lda(x, y, classes, g):
    """The textbook closed form on the pooled rows (no sufficient statistics, no pooling)."""
    n, d = x.shape
    means = torch.stack([x[y == c].mean(0) for c in range(classes)])
    cov = (x - means[y]).T @ (x - means[y]) / n
    sigma = (1 - g) * cov + g * torch.trace(cov) / d * torch.eye(d, dtype=torch.float64)
    prec = torch.linalg.inv(sigma)
    prior = torch.bincount(y, minlength=classes).double() / n
    w = means @ prec  # [C, d]
    return w, -0.5 * (w * means).sum(1) + prior.log()


def test_ridge_head_equals_the_centralized_closed_form_under_label_skew():
    x, y, parts = _skewed_clients()
    sizes = [len(p[1]) for p in parts]
    held = [set(p[1].tolist()) for p in parts]
    assert min(len(h) for h in held) < 6 and max(sizes) > 3 * min(s for s in sizes if s)  # really skewed
    stats = [feature_moments(xk, yk, 6) for xk, yk in parts]
    for g in (0.0, 0.3):
        w, b, got = ridge_head(*zip(*stats), shrinkage=g)
        wc, bc = _centralized_lda(x, y, 6, g)
        ours, theirs = x @ w.T + b, x @ wc.T + bc  # equal up to a per-row constant (softmax-invariant)
        assert got == g and w.dtype == torch.float64
        assert torch.allclose(ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True),
                              rtol=0, atol=1e-9)
        assert torch.allclose(ours.softmax(1), theirs.softmax(1), rtol=0, atol=1e-12)


def test_ridge_head_matches_scikit_learn_lda_and_oas():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.covariance import oas
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y, parts = _skewed_clients(seed=3)
    stats = [feature_moments(xk, yk, 6) for xk, yk in parts]
    w, b, g = ridge_head(*zip(*stats))  # OAS shrinkage from the pooled statistics
    means = torch.stack([x[y == c].mean(0) for c in range(6)])
    _, g_ref = oas((x - means[y]).numpy(), assume_centered=True)
    assert g == pytest.approx(g_ref, rel=1e-10, abs=1e-12)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=g).fit(x.numpy(), y.numpy())
    ref = torch.as_tensor(lda.predict_proba(x.numpy()))
    assert torch.allclose((x @ w.T + b).softmax(1), ref, rtol=0, atol=1e-9), sklearn.__version__


def test_pooled_moments_exact_with_float32_on_the_wire_and_a_large_offset():
    x, y, parts = _skewed_clients(seed=1, offset=1e3)
    stats = [tuple(t.float() for t in feature_moments(xk, yk, 6)) for xk, yk in parts]
    means, n, mu, within = pooled_moments(*zip(*stats))
    ref_means = torch.stack([x[y == c].mean(0) for c in range(6)])
    ref_within = (x - ref_means[y]).T @ (x - ref_means[y])
    assert torch.equal(n, torch.bincount(y, minlength=6).double())
    # float32 precision relative to the scatter itself (raw X^T X would lose ~1% here: ||x||^2 ~ 1e6 per row)
    assert float((within - ref_within).abs().max()) < 1e-5 * float(ref_within.abs().max())
    w, b, _ = ridge_head(*zip(*stats), shrinkage=0.1)
    wc, bc = _centralized_lda(x, y, 6, 0.1)
    assert ((x @ w.T + b).argmax(1) == (x @ wc.T + bc).argmax(1)).all()


def test_ridge_head_unseen_class_and_logit_scale():
    x, y, _ = _skewed_clients(seed=2, classes=3)
    s, c, m = feature_moments(x, y, 4)  # class 3: no examples anywhere
    w, b, _ = ridge_head([s], [c], [m], shrinkage=0.2)
    w2, b2, _ = ridge_head([s], [c], [m], shrinkage=0.2, logit_scale=0.5)
    assert torch.equal(w[3], torch.zeros(7)) and torch.allclose(w2, 0.5 * w) and torch.allclose(b2, 0.5 * b)
    assert ((x @ w.T + b).argmax(1) != 3).all()
    few = feature_moments(x[:3], y[:3], 4)  # 3 rows, 7 features: singular without shrinkage
    with pytest.raises(ValueError, match="singular at shrinkage 0"):
        ridge_head([few[0]], [few[1]], [few[2]], shrinkage=0.0)
    with pytest.raises(ValueError, match="no examples"):
        pooled_moments([torch.zeros(2, 3)], [torch.zeros(2)], [torch.zeros(3, 3)])


def test_oas_shrinkage_hand_computed():
    # cov = diag(2, 0): mu = 1, alpha = mean(cov^2) = 1; g = (1 + 1) / ((n + 1)(1 - 1/2)) = 4 / (n + 1)
    cov = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert oas_shrinkage(cov, 7) == pytest.approx(0.5)
    assert oas_shrinkage(cov, 1) == 1.0  # capped
    assert oas_shrinkage(torch.eye(3, dtype=torch.float64), 10) == 1.0  # already isotropic


def test_clients_ridge_statistics_through_the_wire_give_the_pooled_head():
    """The clients' head_init answers (float32 statistics of their own rows) build the head a
    centralized fit on all their rows gives: the same predictions, logits equal to float32 precision."""
    from fedtune.client.worker import get_worker
    from fedtune.head_init import HEAD_INITS, client_head_stats, head_features
    from fedtune.presets import resolve

    cfg = resolve("tiny", overrides={"head-init": "ridge", "head-init-examples": "100000", "dirichlet-alpha": "0.1",
                                      "max-length": "16", "head-shrinkage": "0.2"})
    parts, xs, ys = [], [], []
    for c in range(cfg.partition.num_clients):
        w = get_worker(cfg, c)
        stats, n = client_head_stats(w.model, w.data.train, cfg.train, w.pad_id)
        assert n == len(w.data.train) and stats["scatter"].dtype == torch.float32
        parts.append(stats)
        x, y = head_features(w.model, w.data.train, 64, w.pad_id)
        xs.append(x)
        ys.append(y)
    weight, bias = HEAD_INITS.get("ridge").build(parts, cfg.train)
    x, y = torch.cat(xs), torch.cat(ys)
    wc, bc = _centralized_lda(x, y, 20, 0.2)
    ours, theirs = x @ weight.double().T + bias.double(), cfg.train.head_ridge_scale * (x @ wc.T + bc)
    ours, theirs = ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert float((ours - theirs).abs().max()) < 1e-3 * float(theirs.abs().max())


def test_centralized_ceiling_starts_from_the_federations_ridge_head(tmp_path):
    """The centralized run's round 0 is the federation's round 0 under Dirichlet(0.1): both build
    the ridge head from the clients' own head samples (here capped at 5 rows a client, so a pooled
    sample would differ)."""
    from fedtune.client.worker import get_worker
    from fedtune.artifacts import RunDir
    from fedtune.head_init import HEAD_INITS, client_head_stats, clients_head, head_module
    from fedtune.presets import resolve
    from fedtune.simulations.centralized import centralized
    from fedtune.simulations.sequential import sequential

    over = {"head-init": "ridge", "head-init-examples": "5", "dirichlet-alpha": "0.1", "max-length": "16",
            "rounds": "1", "local-steps": "1"}
    cfg = resolve("tiny", overrides=over)
    workers = [get_worker(cfg, c) for c in range(cfg.partition.num_clients)]
    fed_w, fed_b = HEAD_INITS.get("ridge").build(
        [client_head_stats(w.model, w.data.train, cfg.train, w.pad_id)[0] for w in workers], cfg.train)
    model = workers[0].model
    n = clients_head(model, [w.data.train for w in workers], cfg.train, workers[0].pad_id)
    assert n == 5 * len(workers)
    head = head_module(model)
    torch.testing.assert_close(head.weight.detach(), fed_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(head.bias.detach(), fed_b, rtol=0, atol=1e-6)

    # end to end: the ceiling's round-0 accuracy and loss are the federation's
    centralized(cfg, tmp_path / "c")
    first = RunDir(tmp_path / "c").metrics()[0]
    fed0 = sequential(cfg, progress=lambda *_: None)[0]
    assert first["round"] == 0
    assert first["accuracy"] == pytest.approx(fed0["accuracy"], abs=1e-9)
    assert first["loss"] == pytest.approx(fed0["loss"], rel=1e-5)
