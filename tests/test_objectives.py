"""Objectives against autograd, finite differences and closed forms."""
import math

import pytest
import torch

from metatele import nets
from metatele.objectives import (curvature, curve_curvature, curve_derivatives, grad_norm_sq,
                                 make_objective, sample_directions, sample_lie_directions, sharpness,
                                 SHARPNESS_RADII)
from metatele.symmetry import transform

DT = torch.float64


def _problem(dims, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    extra = 1 if bias else 0
    W = tuple(torch.randn(dims[i + 2], dims[i + 1] + extra, generator=g, dtype=DT) / math.sqrt(dims[i + 1])
              for i in range(len(dims) - 2))
    X = torch.randn(dims[1], dims[0], generator=g, dtype=DT)
    Y = torch.randn(dims[-1], dims[0], generator=g, dtype=DT)
    return W, X, Y


def test_grad_norm_matches_closed_form_one_layer():
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(3, 4, generator=g, dtype=DT),)
    X, Y = torch.randn(4, 5, generator=g, dtype=DT), torch.randn(3, 5, generator=g, dtype=DT)
    grad = (W[0] @ X - Y) @ X.T  # d/dW 1/2||Y - WX||^2
    assert torch.allclose(grad_norm_sq(W, X, Y), (grad ** 2).sum())


def test_curvature_of_circle_is_inverse_radius():
    for r in [0.5, 2.0, 7.0]:
        t = torch.tensor(0.3, dtype=DT)
        # gamma(t) = r (cos t, sin t): first and second derivatives
        g1 = (torch.stack([-r * torch.sin(t), r * torch.cos(t)]).reshape(1, 2),)
        g2 = (torch.stack([-r * torch.cos(t), -r * torch.sin(t)]).reshape(1, 2),)
        assert float(curve_curvature(g1, g2)) == pytest.approx(1 / r, rel=1e-12)


@pytest.mark.parametrize("dims,bias", [([7, 7, 7, 7, 3], False), ([6, 6, 6, 3], False), ([6, 5, 5, 5, 2], True)])
def test_closed_form_curve_derivatives_match_autograd(dims, bias):
    """Square problems (batch == every input width incl. bias), where the curve is exactly exp(tM) . w."""
    W, X, _ = _problem(dims, bias=bias)
    Ms = sample_lie_directions(W, None, torch.Generator().manual_seed(1))
    a1, a2 = curve_derivatives(W, X, Ms, method="autograd", bias=bias)
    c1, c2 = curve_derivatives(W, X, Ms, method="closed", bias=bias)
    for x, y in zip(c1 + c2, a1 + a2):
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-9 * float(y.abs().max()))
    k_a, k_c = curve_curvature(a1, a2), curve_curvature(c1, c2)
    assert float(k_c) == pytest.approx(float(k_a), rel=1e-8)


def test_cross_term_matters_for_two_hidden_layers():
    W, X, _ = _problem([7, 7, 7, 7, 3])
    Ms = sample_lie_directions(W, None, torch.Generator().manual_seed(2))
    a1, a2 = curve_derivatives(W, X, Ms, method="autograd")
    p1, p2 = curve_derivatives(W, X, Ms, method="paper")
    assert torch.allclose(p1[1], a1[1])                      # first derivative is right in the paper
    assert not torch.allclose(p2[1], a2[1], rtol=1e-3)       # second derivative misses the cross term


def test_closed_form_matches_finite_differences_of_curve():
    W, X, _ = _problem([6, 6, 6, 6, 2])
    Ms = sample_lie_directions(W, None, torch.Generator().manual_seed(3))

    def curve(t):
        return transform(W, X, [torch.linalg.matrix_exp(t * M) for M in Ms])

    h = 1e-4
    cp, c0, cm = curve(h), curve(0.0), curve(-h)
    c1, c2 = curve_derivatives(W, X, Ms)
    for i in range(len(W)):
        fd1 = (cp[i] - cm[i]) / (2 * h)
        fd2 = (cp[i] - 2 * c0[i] + cm[i]) / h ** 2
        assert torch.allclose(fd1, c1[i], atol=1e-6 * float(c1[i].abs().max()) + 1e-8)
        assert torch.allclose(fd2, c2[i], atol=1e-4 * float(c2[i].abs().max()) + 1e-6)


def test_curvature_batched_over_curves_equals_loop():
    W, X, _ = _problem([6, 6, 6, 6, 2])
    Ms = sample_lie_directions(W, 3, torch.Generator().manual_seed(4))
    fast = curvature(W, X, Ms=Ms)
    slow = curvature(W, X, Ms=Ms, method="autograd")
    assert float(fast) == pytest.approx(float(slow), rel=1e-8)


def test_sharpness_definition_and_directions():
    W, X, Y = _problem([5, 4, 6, 3])
    radii = [0.0, 0.1]
    dirs = sample_directions(W, 2, torch.Generator().manual_seed(0))
    for u in dirs:
        assert float(sum((d ** 2).sum() for d in u)) == pytest.approx(1.0)
    phi = sharpness(W, X, Y, loss="mse", radii=radii, dirs=dirs)
    ref = (nets.mse_loss(W, X, Y) + nets.mse_loss(tuple(w + 0.1 * d for w, d in zip(W, dirs[1])), X, Y)) / 2
    assert torch.allclose(phi, ref)
    assert len(SHARPNESS_RADII["mnist"]) == 20 and len(SHARPNESS_RADII["cifar10"]) == 20
    # gaussian directions are zero mean; the paper's uniform ones are all positive
    u = sample_directions(W, 1, torch.Generator().manual_seed(0), kind="uniform")[0]
    assert all(bool((d >= 0).all()) for d in u)


def test_make_objective_fixed_directions_and_errors():
    W, X, Y = _problem([5, 4, 6, 3])
    phi = make_objective("sharpness", loss="mse", generator=torch.Generator().manual_seed(0), radii=[0.1])
    assert torch.equal(phi(W, X, Y), phi(W, X, Y))
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("beauty")
    with pytest.raises(ValueError, match="unknown sharpness options"):
        make_objective("sharpness", width=3)
    with pytest.raises(ValueError, match="radii"):
        sharpness(W, X, Y, loss="mse", radii=[])
