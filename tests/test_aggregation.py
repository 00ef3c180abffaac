import pytest
import torch

from fedtune.strategies.aggregation import weighted_mean


def test_weighted_mean_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = weighted_mean([a, b], [1.0, 3.0])  # (1*x_a + 3*x_b) / 4
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[3.0]]))
    assert out["w"].dtype == torch.float32


def test_weighted_mean_single_and_order_invariant():
    xs = [{"w": torch.randn(3, 4)} for _ in range(3)]
    assert torch.allclose(weighted_mean(xs[:1], [5.0])["w"], xs[0]["w"])
    fwd = weighted_mean(xs, [1.0, 2.0, 3.0])["w"]
    rev = weighted_mean(xs[::-1], [3.0, 2.0, 1.0])["w"]
    assert torch.allclose(fwd, rev, atol=1e-7)


@pytest.mark.parametrize(
    "states,weights,msg",
    [
        ([], [], "no states"),
        ([{"w": torch.zeros(2)}], [1.0, 2.0], "1 states but 2 weights"),
        ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [1.0, 1.0], "different keys"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1.0, 1.0], "shape"),
        ([{"w": torch.zeros(2)}], [0.0], "positive sum"),
    ],
)
def test_weighted_mean_rejects_bad_input(states, weights, msg):
    with pytest.raises(ValueError, match=msg):
        weighted_mean(states, weights)
