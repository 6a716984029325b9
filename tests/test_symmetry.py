"""Group actions keep the loss exactly where they should, and say so where they do not."""
import math

import pytest
import torch
from torch import nn

from metatele import nets
from metatele.symmetry import (BOOTH, ROSENBROCK, exactness, group_element, permute, rescale, so2_teleport,
                               transform)

DT = torch.float64


def _problem(dims, seed=0, gaussian=True):
    g = torch.Generator().manual_seed(seed)
    W = tuple(torch.randn(dims[i + 2], dims[i + 1], generator=g, dtype=DT) for i in range(len(dims) - 2)) \
        if gaussian else nets.init_uniform(dims, g, dtype=DT)
    X = torch.randn(dims[1], dims[0], generator=g, dtype=DT)
    Y = torch.randn(dims[-1], dims[0], generator=g, dtype=DT)
    return W, X, Y


def _elements(W, scale, param, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [group_element(torch.randn(w.shape[0], w.shape[0], generator=g, dtype=DT), param, magnitude=scale)
            for w in W[:-1]]


@pytest.mark.parametrize("action", ["inverse", "pseudo_inverse"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0])
@pytest.mark.parametrize("param", ["I+T", "exp"])
def test_exact_actions_keep_loss(action, scale, param):
    dims = [8, 8, 8, 8, 3]  # batch == every width: exact for both forms
    W, X, Y = _problem(dims)
    L0 = nets.mse_loss(W, X, Y)
    W2 = transform(W, X, _elements(W, scale, param), action=action)
    assert exactness(W, X, action=action).verdict == "exact"
    assert abs(float(nets.mse_loss(W2, X, Y) / L0) - 1) < 1e-10
    assert max(float((a - b).abs().max()) for a, b in zip(W, W2)) > 1e-3  # really moved


def test_uniform_paper_problem_exact():
    W, X, Y = _problem([20, 20, 20, 20], gaussian=False)
    L0 = nets.mse_loss(W, X, Y)
    W2 = transform(W, X, _elements(W, 1.0, "exp"))
    assert abs(float(nets.mse_loss(W2, X, Y) / L0) - 1) < 1e-10


def test_sequential_layers_use_transformed_hidden_values():
    """Recomputing h from the transformed earlier weights is exact; reusing the old h is not (the public
    code's version, docs/departures.md, section 1)."""
    W, X, Y = _problem([6, 6, 6, 6, 2])
    gs = _elements(W, 0.5, "exp")
    L0 = nets.mse_loss(W, X, Y)
    assert abs(float(nets.mse_loss(transform(W, X, gs), X, Y) / L0) - 1) < 1e-10
    # the public code's variant: hidden values of the untransformed network for the second pair
    from metatele.symmetry import inverse_form
    h1 = nets.leaky_relu(W[0] @ X)
    U1, V0 = inverse_form(W[1], W[0], X, gs[0])
    U2, V1 = inverse_form(W[2], U1, h1, gs[1])
    assert abs(float(nets.mse_loss((V0, V1, U2), X, Y) / L0) - 1) > 1e-4


def test_linearised_error_is_second_order():
    W, X, Y = _problem([10, 10, 10, 10])
    L0 = nets.mse_loss(W, X, Y)
    T = torch.randn(10, 10, generator=torch.Generator().manual_seed(3), dtype=DT)
    errs = []
    for mag in [1e-2, 5e-3, 2.5e-3]:
        W2 = transform(W, X, [T / T.norm() * mag], action="linearised")
        errs.append(abs(float(nets.mse_loss(W2, X, Y) - L0)))
    assert 3.5 < errs[0] / errs[1] < 4.5 and 3.5 < errs[1] / errs[2] < 4.5
    assert exactness(W, X, action="linearised").verdict == "first_order"


def test_projection_and_approximate_detected():
    W, X, Y = _problem([4, 6, 8, 3])  # batch 4 < input width 6: projection
    ex = exactness(W, X)
    assert ex.verdict == "projection" and ex.loss_preserving
    eye = [torch.eye(8, dtype=DT)]
    W2 = transform(W, X, eye)
    assert not torch.allclose(W2[0], W[0])  # g = I still moves V: V X X^+
    assert torch.allclose(nets.mse_loss(W2, X, Y), nets.mse_loss(W, X, Y), rtol=1e-10)
    W, X, Y = _problem([30, 6, 8, 3])  # batch 30 > widths
    assert exactness(W, X).verdict == "approximate"
    assert exactness(W, X, action="pseudo_inverse").verdict == "approximate"
    assert exactness(W, X, action="linear").verdict == "approximate"  # LeakyReLU is not linear
    with pytest.raises(ValueError, match="slope"):
        transform(W, X, eye, action="linear")


def test_linear_layers_and_datafree():
    W, X, Y = _problem([9, 4, 5, 3])
    L1 = lambda w: nets.mse_loss(w, X, Y, slope=1.0)  # noqa: E731
    W2 = transform(W, X, _elements(W, 2.0, "exp"), action="linear", slope=1.0)
    assert torch.allclose(L1(W2), L1(W), rtol=1e-10)
    U, V = rescale(W[1], W[0], torch.rand(5, dtype=DT) + 0.1)
    assert torch.allclose(nets.mse_loss((V, U), X, Y), nets.mse_loss(W, X, Y), rtol=1e-12)
    U, V = permute(W[1], W[0], torch.tensor([4, 2, 0, 1, 3]))
    assert torch.allclose(nets.mse_loss((V, U), X, Y), nets.mse_loss(W, X, Y), rtol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        rescale(W[1], W[0], -torch.ones(5, dtype=DT))
    with pytest.raises(ValueError, match="permutation"):
        permute(W[1], W[0], torch.tensor([0, 0, 1, 2, 3]))


def test_biased_sequential_teleports_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.LeakyReLU(0.1), nn.Linear(5, 5), nn.LeakyReLU(0.1),
                          nn.Linear(5, 2)).double()
    x = torch.randn(6, 5, dtype=DT)  # batch 6 == 5 inputs + 1 bias column
    W, slope, bias = nets.from_sequential(model)
    X = x.T
    assert exactness(W, X, bias=True).verdict == "exact"
    W2 = transform(W, X, _elements(W, 0.5, "exp"), bias=True)
    out2 = nets.forward(W2, X, bias=True)
    assert torch.allclose(out2, model(x).T, rtol=1e-9, atol=1e-9)


def test_batched_equals_single():
    g = torch.Generator().manual_seed(5)
    W = tuple(torch.randn(3, 7, 7, generator=g, dtype=DT) for _ in range(2))
    X = torch.randn(3, 7, 7, generator=g, dtype=DT)
    gs = [group_element(torch.randn(3, 7, 7, generator=g, dtype=DT), "exp", magnitude=0.5)]
    Wb = transform(W, X, gs)
    for i in range(3):
        Wi = transform(tuple(w[i] for w in W), X[i], [gs[0][i]])
        assert all(torch.allclose(a[i], b) for a, b in zip(Wb, Wi))


def test_bad_group_elements():
    W, X, Y = _problem([6, 6, 6, 2])
    with pytest.raises(ValueError, match="singular"):
        transform(W, X, [torch.zeros(6, 6, dtype=DT)])
    with pytest.raises(ValueError, match="non-finite"):
        transform(W, X, [torch.full((6, 6), math.nan, dtype=DT)])
    with pytest.raises(ValueError, match="must be \\(..., 6, 6\\)"):
        transform(W, X, [torch.eye(5, dtype=DT)])
    with pytest.raises(ValueError, match="one group element per hidden layer"):
        transform(W, X, [])
    with pytest.raises(ValueError, match="unknown action"):
        transform(W, X, [torch.eye(6, dtype=DT)], action="magic")
    with pytest.raises(ValueError, match="invertible LeakyReLU"):
        transform(W, X, [torch.eye(6, dtype=DT)], slope=0.0)
    with pytest.raises(ValueError, match="unknown group parametrisation"):
        group_element(torch.eye(3), "cayley")


@pytest.mark.parametrize("fn,p", [(ROSENBROCK, [-1.0, -1.0]), (BOOTH, [5.0, -5.0])])
def test_so2_teleport_keeps_benchmark_function_loss(fn, p):
    p = torch.tensor(p, dtype=DT)
    for theta in torch.linspace(-3, 3, 13, dtype=DT):
        q = so2_teleport(fn, p, theta)
        assert torch.allclose(fn.loss(q), fn.loss(p), rtol=1e-12)
    assert torch.allclose(fn.from_uv(fn.to_uv(p)), p)


def test_exactness_of_diverged_weights_does_not_crash():
    W, X, _ = _problem([6, 6, 6, 6, 2])
    W = (W[0] * math.nan, W[1], W[2])
    ex = exactness(W, X)
    assert ex.verdict == "approximate" and "non-finite" in ex.detail[1]
