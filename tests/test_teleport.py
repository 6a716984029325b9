"""Hand-designed teleport: direction of the objective change, loss kept, reports, guards, errors."""
import math

import pytest
import torch
from torch import nn

import metatele
from metatele.baselines import run_gd
from metatele.problems import eval_seeds, regression_batch, train_seeds
from metatele.teleport import random_teleport, teleport_weights

DT = torch.float64


def _batch(n=3, dims=(20, 20, 20, 20)):
    return regression_batch(list(dims), train_seeds(n), dtype=DT)


@pytest.mark.parametrize("maximize", [True, False])
def test_grad_norm_ascent_and_descent(maximize):
    b = _batch()
    W, rep = teleport_weights(b.weights, b.X, b.Y, lr=1e-8, steps=5, max_step_norm=0.2 if maximize else 0.01,
                              maximize=maximize)
    if maximize:
        assert bool((rep.objective_after > rep.objective_before * 1.01).all())
    else:
        assert bool((rep.objective_after < rep.objective_before).all())
    assert float(rep.loss_rel_change.max()) < 1e-10
    assert rep.exactness.verdict == "exact" and int(rep.rolled_back.sum()) == 0
    assert torch.equal(rep.steps_taken, torch.full((3,), 5))
    # the reported group element reproduces the teleported weights in one action
    W1 = metatele.transform(b.weights, b.X, rep.elements)
    assert all(torch.allclose(a, c, rtol=1e-6, atol=1e-9) for a, c in zip(W, W1))


@pytest.mark.parametrize("objective,kwargs,lr", [
    ("sharpness", {"radii": [0.05, 0.1], "n_dirs": 2}, 1e-2),
    ("curvature", {"n_curves": 8}, 1e-2),
])
@pytest.mark.parametrize("maximize", [True, False])
def test_sharpness_and_curvature_teleports(objective, kwargs, lr, maximize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.LeakyReLU(0.1), nn.Linear(6, 6), nn.LeakyReLU(0.1),
                          nn.Linear(6, 3)).double()
    x, y = torch.randn(7, 6, dtype=DT), torch.randint(0, 3, (7,))
    out0 = model(x).detach()
    rep = metatele.teleport(model, x, y, objective=objective, loss="ce", lr=lr, steps=3, maximize=maximize,
                            objective_kwargs=kwargs, generator=torch.Generator().manual_seed(0))
    change = rep.objective_after - rep.objective_before
    assert float(change) > 0 if maximize else float(change) < 0
    assert torch.allclose(model(x), out0, atol=1e-8)  # exact: batch 7 == 6 inputs + bias


def test_cap_stops_early():
    b = _batch()
    _, rep0 = teleport_weights(b.weights, b.X, b.Y, lr=1e-8, steps=0)
    cap = float(rep0.objective_before.min()) * 0.5  # already above the cap: nothing happens
    W, rep = teleport_weights(b.weights, b.X, b.Y, lr=1e-8, steps=5, cap=cap)
    assert bool(rep.capped.all()) and int(rep.steps_taken.sum()) == 0
    assert all(torch.equal(a, c) for a, c in zip(W, b.weights))


def test_non_finite_step_rolled_back_and_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2)).double()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    def exploding(w, X, Y):  # an objective whose gradient is infinite: the step would be non-finite
        return metatele.grad_norm_sq(w, X, Y, bias=True) * math.inf

    rep = metatele.teleport(model, x, y, objective=exploding, steps=2)
    assert bool(rep.rolled_back.all()) and int(rep.steps_taken) == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert "rolled back 1" in rep.summary()


def test_batched_equals_one_at_a_time():
    b = _batch(3)
    Wb, rb = teleport_weights(b.weights, b.X, b.Y, lr=1e-9, steps=3, max_step_norm=0.1)
    for i in range(3):
        Wi, ri = teleport_weights(tuple(w[i] for w in b.weights), b.X[i], b.Y[i], lr=1e-9, steps=3,
                                  max_step_norm=0.1)
        assert all(torch.allclose(a[i], c, rtol=1e-9) for a, c in zip(Wb, Wi))
        assert float(ri.objective_after) == pytest.approx(float(rb.objective_after[i]), rel=1e-9)


def test_inexact_batch_reported_and_require_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.1), nn.Linear(3, 2)).double()
    x, y = torch.randn(50, 4, dtype=DT), torch.randn(50, 2, dtype=DT)
    rep = metatele.teleport(model, x, y, lr=1e-3, steps=2)
    assert rep.exactness.verdict == "approximate"
    with pytest.raises(ValueError, match="not exact on this batch"):
        metatele.teleport(model, x, y, require_exact=True)


def test_random_teleport_keeps_loss():
    b = _batch(2)
    W, rep = random_teleport(b.weights, b.X, b.Y, magnitude=0.3, generator=torch.Generator().manual_seed(0))
    assert float(rep.loss_rel_change.max()) < 1e-10
    assert float(torch.linalg.matrix_norm(rep.elements[0] - torch.eye(20, dtype=DT)).max()) == pytest.approx(0.3)
    _, rep_u = random_teleport(b.weights, b.X, b.Y, directions="uniform", magnitude=0.3)
    assert bool(((rep_u.elements[0] - torch.eye(20, dtype=DT)) >= 0).all())


def test_bad_inputs():
    b = _batch(1)
    with pytest.raises(ValueError, match="lr must be"):
        teleport_weights(b.weights, b.X, b.Y, lr=-1.0)
    with pytest.raises(ValueError, match="steps must be"):
        teleport_weights(b.weights, b.X, b.Y, steps=-2)
    with pytest.raises(ValueError, match="unknown action"):
        teleport_weights(b.weights, b.X, b.Y, action="teleport")
    with pytest.raises(ValueError, match="last dimension must be 7"):
        teleport_weights(b.weights, b.X[:, :7], b.Y)
    model = nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.1), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="batch 5 but targets have 4"):
        metatele.teleport(model, torch.randn(5, 4), torch.randn(4, 2))
    with pytest.raises(ValueError, match="integer class targets"):
        metatele.teleport(model, torch.randn(5, 4), torch.randn(5, 2), loss="ce")
    with pytest.raises(TypeError, match="nn.LeakyReLU"):
        metatele.teleport(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), torch.randn(5, 4),
                          torch.randn(5, 2))


def test_gd_baselines_batched_and_teleport_schedule():
    b = regression_batch([20, 20, 20, 20], eval_seeds(3))
    r = run_gd(b.weights, b.X, b.Y, steps=50, lr=3e-4)
    assert r.loss.shape == (3, 50) and r.grad_norm_sq.shape == (3, 50) and r.time.shape == (50,)
    assert bool((r.loss[:, -1] < r.loss[:, 0] * 1e-2).all())
    single = run_gd(tuple(w[1] for w in b.weights), b.X[1], b.Y[1], steps=50, lr=3e-4)
    assert torch.allclose(single.loss, r.loss[1], rtol=1e-4)
    rt = run_gd(b.weights, b.X, b.Y, steps=50, lr=3e-4, teleport_at=[5],
                teleport_kwargs=dict(lr=1e-7, steps=4, max_step_norm=0.05))
    assert len(rt.teleports) == 1 and torch.equal(rt.loss[:, :5], r.loss[:, :5])
    assert bool((rt.grad_norm_sq[:, 5] > r.grad_norm_sq[:, 5]).all())  # teleport raised the gradient norm
    with pytest.raises(ValueError, match="outside"):
        run_gd(b.weights, b.X, b.Y, steps=5, lr=1e-4, teleport_at=[9])


def test_random_teleport_model_in_place():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    out0, w0 = model(x).detach(), model[0].weight.detach().clone()
    rep = metatele.random_teleport_model(model, x, y, magnitude=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(x), out0, atol=1e-10) and not torch.allclose(model[0].weight, w0)
    assert float(rep.loss_rel_change) < 1e-10
