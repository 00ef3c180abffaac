"""Aggregation math for heterogeneous-rank federated LoRA (fedtune.strategies.lora)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from fedtune.strategies import lora as L
from fedtune.strategies.lora import ClientFactors

D_OUT, D_IN, ALPHA = 12, 20, 16.0
RANKS = (2, 4, 8, 16)
SCALES = {"lora": L.lora_scale, "rslora": L.rslora_scale}
F64 = torch.float64


def make_clients(scale_fn: Callable[[float, int], float], seed: int = 0, ranks=RANKS) -> list[ClientFactors]:
    """Random float32 clients of mixed ranks, scales scale_fn(ALPHA, r) and uneven weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        A = torch.randn(r, D_IN, generator=g) / math.sqrt(D_IN)
        B = torch.randn(D_OUT, r, generator=g) * 0.5
        out.append(ClientFactors(A, B, scale_fn(ALPHA, r), weight=float(10 + 7 * i)))
    return out


def reference(clients: list[ClientFactors]) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i with w normalised, computed here independently in float64."""
    total = sum(c.weight for c in clients)
    return sum((c.weight / total) * c.scale * (c.B.double() @ c.A.double()) for c in clients)


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """|got - want| <= tol * (1 + |want|) elementwise (torch.testing.assert_close costs ~1 s to warm up)."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    err = (got.double() - want.double()).abs() - tol * (1 + want.double().abs())
    assert err.max().item() <= 0, f"max abs error {(got.double() - want.double()).abs().max().item():.3g} > {tol}"


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SCALES))
def test_exact_methods_equal_weighted_sum_of_updates(kind: str) -> None:
    clients = make_clients(SCALES[kind])
    want = reference(clients)
    close(L.exact_mean_delta(clients), want)
    close(L.flora(clients), want)
    A_stack, B_stack = L.flora_stack(clients)
    assert A_stack.shape == (sum(RANKS), D_IN) and B_stack.shape == (D_OUT, sum(RANKS))
    close(B_stack @ A_stack, want)
    close(L.flexlora(clients), want)  # before truncation
    fx = L.fedex(clients)
    assert fx.factors.rank == max(RANKS) and fx.residual.shape == (D_OUT, D_IN)
    close(fx.factors.scale * (fx.factors.B.double() @ fx.factors.A.double()) + fx.residual.double(), want)
    assert set(L.EXACT_METHODS) == {"flora", "fedex", "flexlora"}


def test_fedex_factors_are_fedavg_and_residual_is_its_error() -> None:
    clients = make_clients(L.lora_scale, seed=3)
    fx, avg = L.fedex(clients), L.fedavg(clients)
    assert torch.equal(fx.factors.A, avg.A) and torch.equal(fx.factors.B, avg.B) and fx.factors.scale == avg.scale
    close(fx.residual, reference(clients) - avg.delta())


@pytest.mark.parametrize("kind", sorted(SCALES))
def test_naive_fedavg_is_not_exact(kind: str) -> None:
    clients = make_clients(SCALES[kind], seed=1)
    want = reference(clients)
    rel = torch.linalg.matrix_norm(L.fedavg(clients).delta() - want) / torch.linalg.matrix_norm(want)
    assert rel.item() > 1e-3


# --- FlexLoRA truncation ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SCALES))
def test_flexlora_truncation_error_is_dropped_singular_values(kind: str) -> None:
    clients = make_clients(SCALES[kind], seed=2)
    delta = L.flexlora(clients)
    S = torch.linalg.svdvals(delta.double())
    for c in clients:
        f = L.flexlora_redistribute(delta, c.rank, c.scale)
        assert f.A.shape == (c.rank, D_IN) and f.B.shape == (D_OUT, c.rank) and f.scale == c.scale
        err = L.flexlora_truncation_error(delta, f)
        assert err == pytest.approx(torch.linalg.vector_norm(S[c.rank :]).item(), rel=1e-4, abs=1e-6)
        # symmetric split: B'^T B' = A' A'^T = diag(S_r / s), zero-padded past min(d_out, d_in) = len(S)
        gram = torch.diag(torch.cat([S, S.new_zeros(max(RANKS))])[: c.rank] / c.scale)
        close(f.B.double().T @ f.B.double(), gram, tol=1e-4)
        close(f.A.double() @ f.A.double().T, gram, tol=1e-4)


def test_flexlora_hand_example() -> None:
    delta = t([[3.0, 0.0], [0.0, 1.0]])
    f = L.flexlora_redistribute(delta, rank=1, scale=4.0)
    close(f.A.abs(), t([[math.sqrt(0.75), 0.0]]))  # sqrt(3 / 4); SVD signs are arbitrary
    close(f.B.abs(), t([[math.sqrt(0.75)], [0.0]]))
    close(f.delta(), t([[3.0, 0.0], [0.0, 0.0]]))
    assert L.flexlora_truncation_error(delta, f) == pytest.approx(1.0)
    full = L.flexlora_redistribute(delta, rank=3, scale=4.0)  # rank above min(d_out, d_in): zero-padded
    assert full.rank == 3 and L.flexlora_truncation_error(delta, full) == pytest.approx(0.0, abs=1e-12)


# --- scaling consistency ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SCALES))
def test_redistribution_preserves_scaled_product(kind: str) -> None:
    scale_fn = SCALES[kind]
    clients = make_clients(scale_fn, seed=4)
    delta = L.flexlora(clients)
    full = min(D_OUT, D_IN)
    for r in RANKS:  # a full-rank FlexLoRA redistribution is exact whatever the client's scale
        close(L.flexlora_redistribute(delta, max(r, full), scale_fn(ALPHA, r)).delta(), delta)
    g = L.fedavg(clients)  # slicing at the global rank keeps s * B @ A for any client scale
    for r in RANKS:
        close(L.slice_to_rank(g, g.rank, scale_fn(ALPHA, r)).delta(), g.delta())
    sliced = L.slice_to_rank(g, 4, scale_fn(ALPHA, 4))
    close(sliced.delta(), g.scale * (g.B[:, :4].double() @ g.A[:4].double()))


@pytest.mark.parametrize("kind", sorted(SCALES))
@pytest.mark.parametrize("method", ["fedavg", "hetlora", "ffa"])
def test_identical_clients_keep_their_product(kind: str, method: str) -> None:
    c = make_clients(SCALES[kind], seed=5, ranks=(8,))[0]
    clients = [ClientFactors(c.A, c.B, c.scale, w) for w in (1.0, 5.0, 2.0)]
    g = L.get_method(method)(clients)
    close(g.delta(), c.delta())


@pytest.mark.parametrize("kind", sorted(SCALES))
def test_ffa_exact_with_shared_A_and_mixed_ranks(kind: str) -> None:
    scale_fn, g = SCALES[kind], torch.Generator().manual_seed(6)
    clients = []
    for r in RANKS:  # every client's A is the first r rows of the same frozen A
        B = torch.randn(D_OUT, r, generator=g)
        clients.append(ClientFactors(L.ffa_init_A(7, "q_proj", r, D_IN), B, scale_fn(ALPHA, r), r + 1.0))
    agg = L.ffa(clients)
    assert torch.equal(agg.A, L.ffa_init_A(7, "q_proj", max(RANKS), D_IN))
    close(agg.delta(), reference(clients))
    same = [ClientFactors(c.A[:4], c.B[:, :4], 2.0, c.weight) for c in clients if c.rank >= 4]  # equal scales: B mean
    w = torch.tensor([c.weight for c in same], dtype=F64)
    close(L.ffa(same).B, sum((wi / w.sum()) * c.B.double() for wi, c in zip(w, same)))


# --- hand-computed examples ------------------------------------------------------------------


def test_fedavg_hand_example_with_padding() -> None:
    c1 = ClientFactors(t([[1.0, 0.0]]), t([[2.0], [0.0]]), scale=1.0, weight=1.0)  # rank 1
    c2 = ClientFactors(t([[0.0, 1.0], [1.0, 1.0]]), t([[0.0, 1.0], [4.0, 0.0]]), scale=3.0, weight=3.0)  # rank 2
    g = L.fedavg([c1, c2])  # weights 1/4, 3/4
    close(g.A, t([[0.25, 0.75], [0.75, 0.75]]))
    close(g.B, t([[0.5, 0.75], [3.0, 0.0]]))
    assert g.scale == pytest.approx(2.5)
    close(g.delta(), t([[1.71875, 2.34375], [1.875, 5.625]]))
    close(L.exact_mean_delta([c1, c2]), t([[2.75, 2.25], [0.0, 9.0]]))  # what fedavg misses


def test_hetlora_hand_example() -> None:
    c1 = ClientFactors(t([[1.0, 0.0]]), t([[3.0], [4.0]]), scale=2.0, weight=1.0)  # ||BA|| = 5 -> 5
    c2 = ClientFactors(t([[0.0, 2.0]]), t([[1.0], [0.0]]), scale=4.0, weight=3.0)  # ||BA|| = 2 -> 6
    close(L.hetlora_weights([c1, c2]), t([5 / 11, 6 / 11]))
    g = L.hetlora([c1, c2])
    close(g.A, t([[5 / 11, 12 / 11]]))
    close(g.B, t([[21 / 11], [20 / 11]]))
    assert g.scale == pytest.approx(34 / 11)
    zero = [ClientFactors(c.A, torch.zeros_like(c.B), c.scale, c.weight) for c in (c1, c2)]
    close(L.hetlora_weights(zero), t([0.25, 0.75]))  # all-zero products: data weights


def test_hetlora_prune_rank_hand_example() -> None:
    A = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    B = t([[1.0, 0.0, 0.01], [0.0, 0.1, 0.0]])  # component norms 1, 0.1, 0.01 * sqrt(2)
    assert L.hetlora_prune_rank(A, B, gamma=0.01) == 3
    assert L.hetlora_prune_rank(A, B, gamma=0.05) == 2
    assert L.hetlora_prune_rank(A, B, gamma=0.5) == 1
    assert L.hetlora_prune_rank(A, B, gamma=5.0) == 1  # never below min_rank
    assert L.hetlora_prune_rank(A, B, gamma=5.0, min_rank=2) == 2
    B_mid = t([[1.0, 0.0, 1.0], [0.0, 0.001, 0.0]])  # only trailing components are dropped
    assert L.hetlora_prune_rank(A, B_mid, gamma=0.05) == 3


def test_fedsa_averages_only_A() -> None:
    c1 = ClientFactors(t([[1.0, 2.0]]), t([[9.0], [9.0]]), scale=1.0, weight=1.0)
    c2 = ClientFactors(t([[3.0, 4.0], [5.0, 6.0]]), t([[7.0, 7.0], [7.0, 7.0]]), scale=0.5, weight=3.0)
    A, B = L.fedsa([c1, c2])
    close(A, t([[2.5, 3.5], [3.75, 4.5]]))  # row 0: 1/4 [1,2] + 3/4 [3,4]; row 1: 3/4 [5,6] (c1 padded)
    assert B is None


# --- FFA init --------------------------------------------------------------------------------


def test_ffa_init_A_deterministic() -> None:
    a = L.ffa_init_A(1234, "model.layers.0.self_attn.q_proj", 2, 4, dtype=F64)
    assert torch.equal(a, L.ffa_init_A(1234, "model.layers.0.self_attn.q_proj", 2, 4, dtype=F64))
    # pinned values: the same in every process (sha256 seeding, not Python's salted hash())
    golden = t([[-0.2512069066, -0.3532015689, -0.0813449778, 0.1070075146],
                [-0.2918581690, -0.2703473360, -0.2416823789, -0.2929609910]])  # fmt: skip
    close(a, golden, tol=1e-9)
    assert not torch.equal(a, L.ffa_init_A(1234, "model.layers.0.self_attn.v_proj", 2, 4, dtype=F64))
    assert not torch.equal(a, L.ffa_init_A(1235, "model.layers.0.self_attn.q_proj", 2, 4, dtype=F64))
    big = L.ffa_init_A(3, "k", 16, 64)
    assert big.dtype == torch.float32 and big.shape == (16, 64) and big.abs().max() <= 1 / 8
    assert torch.equal(L.ffa_init_A(3, "k", 4, 64), big[:4])  # rank-r A is a prefix of the larger A


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_raises_value_error_naming_the_problem() -> None:
    A, B = torch.zeros(4, D_IN), torch.zeros(D_OUT, 4)
    with pytest.raises(ValueError, match="rank mismatch"):
        ClientFactors(A, torch.zeros(D_OUT, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="negative"):
        ClientFactors(A, B, 1.0, -1.0)
    with pytest.raises(ValueError, match="scale"):
        ClientFactors(A, B, 0.0, 1.0)
    with pytest.raises(ValueError, match="rank mismatch"):
        L.hetlora_prune_rank(A, torch.zeros(D_OUT, 5), gamma=0.1)
    for name in L.method_names():
        with pytest.raises(ValueError, match="empty"):
            L.get_method(name)([])
    with pytest.raises(ValueError, match="sum to zero"):
        L.fedavg([ClientFactors(A, B, 1.0, 0.0)])
    with pytest.raises(ValueError, match="shape mismatch"):
        L.flora([ClientFactors(A, B, 1.0, 1.0), ClientFactors(torch.zeros(4, D_IN + 1), B, 1.0, 1.0)])
    with pytest.raises(ValueError, match="shared frozen A"):
        L.ffa([ClientFactors(A, B, 1.0, 1.0), ClientFactors(A + 1, B, 1.0, 1.0)])
    with pytest.raises(ValueError, match="unknown LoRA aggregation method 'nope'"):
        L.get_method("nope")


# --- per-layer helper, purity ----------------------------------------------------------------


def test_aggregate_layers_over_dicts() -> None:
    a, b = make_clients(L.lora_scale, seed=8), make_clients(L.rslora_scale, seed=9)
    per_client = [{"q": ca, "v": cb} for ca, cb in zip(a, b)]
    out = L.aggregate_layers(L.flora, per_client)
    assert list(out) == ["q", "v"]
    close(out["q"], reference(a))
    close(out["v"], reference(b))
    ffa_out = L.aggregate_layers(partial(L.ffa, atol=1e-3), [{"q": c} for c in a[:1]])
    close(ffa_out["q"].delta(), a[0].delta())
    with pytest.raises(ValueError, match="different LoRA layers"):
        L.aggregate_layers(L.flora, [{"q": a[0]}, {"v": a[1]}])
    with pytest.raises(ValueError, match="layer 'q'.*shared frozen A"):
        L.aggregate_layers(L.ffa, per_client[:2])


def leaves(x) -> list:
    """Tensors and floats inside a method's result (dataclasses and tuples flattened)."""
    if dataclasses.is_dataclass(x):
        return [v for f in dataclasses.fields(x) for v in leaves(getattr(x, f.name))]
    if isinstance(x, tuple):
        return [v for item in x for v in leaves(item)]
    return [x]


def test_pure_deterministic_and_flower_free() -> None:
    clients = make_clients(L.lora_scale, seed=10)
    before = [(c.A.clone(), c.B.clone()) for c in clients]
    for name in L.method_names():
        if name == "ffa":
            continue
        first, second = leaves(L.get_method(name)(clients)), leaves(L.get_method(name)(clients))
        assert first and len(first) == len(second)
        same = [torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(first, second)]
        assert all(same), name
    assert all(torch.equal(c.A, a) and torch.equal(c.B, b) for c, (a, b) in zip(clients, before))
    for path in Path(L.__file__).parent.glob("*.py"):
        assert "flwr" not in path.read_text(), path
