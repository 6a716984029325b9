"""Functional MLP against nn.Sequential and closed forms."""
import pytest
import torch
from torch import nn

from metatele import nets


def test_leaky_relu_inverse_and_grad():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert torch.allclose(nets.leaky_relu_inv(nets.leaky_relu(x)), x)
    assert torch.equal(nets.leaky_relu(x), nn.functional.leaky_relu(x, 0.1))
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(nets.leaky_relu(x).sum(), x)
    assert torch.equal(g, nets.leaky_relu_grad(x.detach()))


@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_sequential(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.LeakyReLU(0.1), nn.Linear(7, 4, bias=bias),
                          nn.LeakyReLU(0.1), nn.Linear(4, 3, bias=bias)).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    W, slope, b = nets.from_sequential(model)
    assert b == bias and slope == pytest.approx(0.1)
    out = nets.forward(W, x.T, slope=slope, bias=b).T
    assert torch.allclose(out, model(x), atol=1e-12)
    # round trip
    W2 = tuple(w * 2 for w in W)
    nets.to_sequential(W2, model)
    assert all(torch.equal(a, c) for a, c in zip(nets.from_sequential(model)[0], W2))


def test_losses_closed_form():
    g = torch.Generator().manual_seed(1)
    W = nets.init_uniform([6, 4, 5, 3], g, dtype=torch.float64)
    X, Y = nets.regression_data([6, 4, 5, 3], g, dtype=torch.float64)
    f = W[1] @ nets.leaky_relu(W[0] @ X)
    assert torch.allclose(nets.mse_loss(W, X, Y), 0.5 * ((Y - f) ** 2).sum())
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    ref = nn.functional.cross_entropy(f.T, labels)
    assert torch.allclose(nets.ce_loss(W, X, labels), ref)


def test_batched_equals_one_at_a_time():
    g = torch.Generator().manual_seed(2)
    W = nets.init_uniform([5, 4, 6, 3], g, n_init=7, dtype=torch.float64)
    X, Y = nets.regression_data([5, 4, 6, 3], g, n_init=7, dtype=torch.float64)
    batched = nets.mse_loss(W, X, Y)
    single = torch.stack([nets.mse_loss(tuple(w[i] for w in W), X[i], Y[i]) for i in range(7)])
    assert torch.allclose(batched, single)


def test_flatten_roundtrip():
    W = nets.init_uniform([3, 4, 5, 2], torch.Generator().manual_seed(0), n_init=2)
    v = nets.flatten(W, n_lead=1)
    assert v.shape == (2, 4 * 5 + 5 * 2)
    assert all(torch.equal(a, b) for a, b in zip(nets.unflatten(v, W, n_lead=1), W))


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.LeakyReLU"):
        nets.from_sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="slope"):
        nets.from_sequential(nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(0.0), nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="dims"):
        nets.init_uniform([3, 0, 2])
    with pytest.raises(ValueError, match="last dimension must be 4"):
        nets.check_weights((torch.zeros(5, 3), torch.zeros(2, 5)), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="unknown loss"):
        nets.loss_fn("hinge")
