"""metatele.learned: LSTM meta-optimisers, preprocessing, the learned teleport and LearnedOptimizer."""
import copy
import math

import pytest
import torch
from torch import nn

from _meta_tiny import tiny_config
from metatele.checkpoint import ProblemMismatch
from metatele.config import LSTMConfig, TeleportConfig
from metatele.learned import (CoordinateUpdateLSTM, LearnedMethod, LearnedOptimizer, LrTeleportLSTM,
                              TeleportLSTM, UpdateLSTM, preprocess, weight_shapes)
from metatele.meta import MetaTrainer
from metatele.nets import from_sequential, mse_loss
from metatele.problems import eval_seeds, regression_batch


def _g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 1e3


def test_update_lstm_smoke_paper_sizes():
    torch.manual_seed(0)
    net = UpdateLSTM()  # paper: 800 -> 300 -> 800
    st = net.init_state(3)
    u, st2 = net(_g(3, 800), st)
    assert u.shape == (3, 800) and st2[0][0].shape == (3, 300) and torch.isfinite(u).all()


def test_coordinatewise_update_lstm_any_size():
    net = CoordinateUpdateLSTM(hidden=5)
    for P in (7, 33):
        st = net.init_state(2, n_params=P)
        u, st = net(_g(2, P), st)
        assert u.shape == (2, P) and st[1][0].shape == (2 * P, 5)
    # coordinatewise: permuting coordinates permutes the update
    g = _g(1, 10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    u1, _ = net(g, net.init_state(1, n_params=10))
    u2, _ = net(g[:, perm], net.init_state(1, n_params=10))
    torch.testing.assert_close(u1[:, perm], u2)


def test_teleport_lstm_magnitude():
    net = TeleportLSTM(n_in=800, k=20, hidden=300, magnitude=0.01)
    T, st = net(_g(4, 800), net.init_state(4))
    assert T.shape == (4, 20, 20)
    torch.testing.assert_close(torch.linalg.matrix_norm(T), torch.full((4,), 0.01))


@pytest.mark.parametrize("param", ["clamp", "log_sigmoid"])
def test_lr_teleport_lstm_range(param):
    net = LrTeleportLSTM(n_in=800, k=20, hidden=20, lr_param=param, lr_init=3e-4)
    T, lr, st = net(_g(5, 800), net.init_state(5))
    assert T.shape == (5, 20, 20) and lr.shape == (5,)
    assert bool(((lr >= 1e-7) & (lr <= 5e-3)).all())
    if param == "log_sigmoid":  # untrained LSTM starts near lr_init, and the lr head has gradients
        h = torch.zeros(1, 20)
        assert math.isclose(float(net.step_size(h).detach()), 3e-4, rel_tol=1e-4)
        lr.sum().backward()
        assert net.lr_head.bias.grad.abs().item() > 0


def test_log_sign_preprocessing_matches_formula():
    g = torch.tensor([[3.0, -1e-6, 0.0, -200.0, 1e-5]])
    x = preprocess(g, "log_sign", p=10.0)
    assert x.shape == (1, 10)
    for i, v in enumerate(g[0].tolist()):
        if abs(v) >= math.exp(-10):
            exp1, exp2 = math.log(abs(v)) / 10, math.copysign(1.0, v) if v != 0 else 0.0
        else:
            exp1, exp2 = -1.0, v * math.exp(10)
        assert math.isclose(float(x[0, i]), exp1, rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(float(x[0, 5 + i]), exp2, rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("param", ["I+T", "exp"])
def test_exact_learned_teleport_keeps_loss_float32(param):
    """Paper problem, 20 seeds, float32: the exact action keeps the loss to 1e-6 relative."""
    prob = regression_batch([20, 20, 20, 20], eval_seeds(20))
    torch.manual_seed(0)
    m = LearnedMethod("lstm_update_tele", weight_shapes(prob.dims), LSTMConfig(tele_hidden=16),
                      TeleportConfig(param=param))
    W = tuple(w.requires_grad_() for w in prob.weights)
    L0 = mse_loss(W, prob.X, prob.Y)
    g = torch.autograd.grad(L0.sum(), W)
    with torch.no_grad():
        Ts, _ = m.propose_teleport(g, m.init_state(20))
        W2 = m.teleport(prob.weights, prob.X, Ts, torch.linalg.pinv(prob.X.double()))
        L1 = mse_loss(W2, prob.X, prob.Y)
    assert W2[0].dtype == torch.float32
    assert not torch.allclose(W2[0], prob.weights[0])
    rel = ((L1.double() - L0.detach().double()).abs() / L0.detach().double()).max()
    assert rel < 1e-6, rel


def test_linearised_action_is_first_order_only():
    prob = regression_batch([20, 20, 20, 20], eval_seeds(4), dtype=torch.float64)
    m = LearnedMethod("lstm_update_tele", weight_shapes(prob.dims), LSTMConfig(tele_hidden=8),
                      TeleportConfig(action="linearised", magnitude=0.1))
    T = torch.randn(4, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = 0.1 * T / torch.linalg.matrix_norm(T)[:, None, None]
    L0 = mse_loss(prob.weights, prob.X, prob.Y)
    L_lin = mse_loss(m.teleport(prob.weights, prob.X, [T]), prob.X, prob.Y)
    m.tele_cfg.action = "inverse"
    L_ex = mse_loss(m.teleport(prob.weights, prob.X, [T]), prob.X, prob.Y)
    assert ((L_ex - L0).abs() / L0).max() < 1e-10
    assert ((L_lin - L0).abs() / L0).max() > 1e-6


def _tiny_ckpt(tmp_path, method):
    cfg = tiny_config()
    tr = MetaTrainer(method, cfg)
    tr.run_meta_batch()
    path = tmp_path / f"{method}.pt"
    tr.save(path)
    return path, tr


@pytest.mark.parametrize("method", ["lstm_update_tele", "lstm_lr_tele"])
def test_learned_optimizer_on_sequential(tmp_path, method):
    path, tr = _tiny_ckpt(tmp_path, method)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.LeakyReLU(0.1), nn.Linear(4, 3, bias=False))
    xb, yb = torch.rand(4, 5), torch.rand(4, 3)
    opt = LearnedOptimizer.from_checkpoint(path, model.parameters())
    # reference: the method's own update on explicit tensors
    W0, _, _ = from_sequential(model)
    loss = 0.5 * (model(xb) - yb).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    grads = tuple(p.grad.detach().unsqueeze(0) for p in model.parameters())
    with torch.no_grad():
        ref, _ = opt.method.propose_update(tuple(w.unsqueeze(0) for w in W0), grads,
                                           opt.method.init_state(1))
    opt.step()
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r[0])
    before = model(xb).detach()
    assert opt.teleport(model, xb) is True
    after = model(xb).detach()
    W1, _, _ = from_sequential(model)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)   # exact action: same outputs
    # the weights did move
    assert not torch.allclose(W1[1], ref[1][0])


def test_learned_optimizer_rejects_other_problem_size(tmp_path):
    path, _ = _tiny_ckpt(tmp_path, "lstm_update")
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.LeakyReLU(0.1), nn.Linear(4, 3, bias=False))
    with pytest.raises(ProblemMismatch, match="shapes"):
        LearnedOptimizer.from_checkpoint(path, model.parameters())


def test_precond_update_vanishes_with_gradient_and_starts_near_gd():
    net = UpdateLSTM(30, 8, preprocess="log_sign", update_param="precond", precond_lr=1e-3, precond_range=2.0)
    g = _g(2, 30) * 1e-3
    u, _ = net(g, net.init_state(2))
    ratio = u / g
    assert bool((ratio > 1e-3 * math.exp(-2.0) - 1e-12).all() and (ratio < 1e-3 * math.exp(2.0)).all())
    u0, _ = net(torch.zeros(2, 30), net.init_state(2))
    assert torch.count_nonzero(u0) == 0
    c = CoordinateUpdateLSTM(4, update_param="precond", precond_lr=1e-3)
    u1, _ = c(g, c.init_state(2, n_params=30))
    assert torch.allclose(u1 / g, torch.full_like(g, 1e-3), rtol=0.5)


def _unrolled_meta_grads(method, defer: bool, K: int = 4):
    """Meta-gradients of a K-step unrolled window of ``method`` (float64), with or without deferral."""
    from metatele.meta.higher_adapter import AutogradStepper
    from metatele.meta.unroll import run_window, start

    method.defer_weight_grads(defer)
    prob = regression_batch([4, 5, 4, 3], eval_seeds(2), dtype=torch.float64)
    s = start(method, prob.weights, prob.X, prob.Y)
    _, meta, _ = run_window(method, s, K, AutogradStepper(first_order=True), kind="log")
    method.zero_grad(set_to_none=True)
    meta.backward()
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,arch", [("lstm_update_tele", "full"), ("lstm_update", "coordinatewise"),
                                       ("lstm_lr_tele", "full")])
def test_deferred_weight_gradients_equal_autograd(name, arch):
    """The meta-trainer's deferred LSTM weight gradients (one matrix product per window) equal plain
    autograd's per-step accumulation, for every parameter of every learned method (float64)."""
    torch.manual_seed(0)
    cfg = LSTMConfig(update_arch=arch, update_hidden=7, tele_hidden=6, lr_tele_hidden=5, coord_hidden=4,
                     preprocess="log_sign", update_scale=0.01, lr_param="log_sigmoid", lr_init=1e-2,
                     lr_max=5e-2, lr_min=1e-5)
    m = LearnedMethod(name, weight_shapes([4, 5, 4, 3]), cfg, TeleportConfig(magnitude=0.05)).double()
    ref = _unrolled_meta_grads(m, defer=False)
    got = _unrolled_meta_grads(m, defer=True)
    assert set(ref) == set(got) and len(ref) == len(list(m.parameters()))
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-10, atol=1e-14), n
    # accumulation into an existing .grad, as Tensor.backward does
    from metatele.learned.deferred import deferred_linear
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64)
    w.grad = torch.ones_like(w)
    deferred_linear(x, w).sum().backward()
    assert torch.allclose(w.grad, 1 + torch.ones(2, 3, dtype=torch.float64).T @ x)


def test_deferred_linear_input_gradient_of_some_rows():
    """``grad_rows``: the input gradient of those rows equals autograd's, the other rows get zero, and the
    weight gradient is unchanged."""
    from metatele.learned.deferred import deferred_linear
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(5, 3, dtype=torch.float64)
    (torch.nn.functional.linear(x, w) * gy).sum().backward()
    ref_x, ref_w = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    rows = torch.tensor([1, 4])
    (deferred_linear(x, w, grad_rows=rows) * gy).sum().backward()
    assert torch.allclose(w.grad, ref_w, rtol=1e-13, atol=0)
    assert torch.allclose(x.grad[rows], ref_x[rows], rtol=1e-13, atol=0)
    assert torch.count_nonzero(x.grad[[0, 2, 3]]) == 0


def test_deferred_linear_in_bfloat16():
    """``dtype=torch.bfloat16``: the output, the input gradient and the (deferred) weight gradient are the
    products of the bfloat16-rounded operands returned in float32, the bias stays float32, and a weight changed
    in place by a fused optimiser step is used as it is now."""
    from metatele.learned.deferred import deferred_linear
    torch.manual_seed(0)
    bf = torch.bfloat16
    w = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    x = torch.randn(4, 5, requires_grad=True)
    gy = torch.randn(4, 6)
    y = deferred_linear(x, w, b, dtype=bf)
    assert y.dtype == torch.float32
    assert torch.equal(y, (x.detach().to(bf) @ w.detach().to(bf).T).float() + b.detach())
    (y * gy).sum().backward()
    assert torch.equal(x.grad, (gy.to(bf) @ w.detach().to(bf)).float())
    assert torch.equal(w.grad, (gy.to(bf).T @ x.detach().to(bf)).float())
    assert torch.equal(b.grad, gy.sum(0))
    assert torch.allclose(w.grad, gy.T @ x.detach(), rtol=0.05, atol=0.05)  # close to float32
    w.grad = torch.ones_like(w)
    torch.optim.Adam([w], lr=0.1, fused=True).step()  # changes w without bumping its version counter
    y2 = deferred_linear(x, w, b, dtype=bf)
    assert torch.equal(y2, (x.detach().to(bf) @ w.detach().to(bf).T).float() + b.detach())
    # the weights' own dtype is the plain path
    assert torch.equal(deferred_linear(x, w, b, dtype=torch.float32), torch.nn.functional.linear(x, w, b))
    # inside reuse_casts a weight is rounded once; after the block the next use rounds its current value
    from metatele.learned import deferred
    with deferred.reuse_casts():
        deferred_linear(x, w, b, dtype=bf)
        first = deferred._CASTS[id(w)][1]
        deferred_linear(x, w, b, dtype=bf)
        assert deferred._CASTS[id(w)][1] is first and len(deferred._CASTS) == 1
    assert deferred._CASTS is None
    with torch.no_grad():
        w.add_(1.0)
    y3 = deferred_linear(x, w, b, dtype=bf)
    assert torch.equal(y3, (x.detach().to(bf) @ w.detach().to(bf).T).float() + b.detach())


def test_learned_optimizer_teleport_validates_inputs_and_guards(tmp_path):
    """Issue 9.3: bad inputs to LearnedOptimizer.teleport give a ValueError / TypeError naming the argument;
    a teleport that would not keep the outputs (batch larger than the widths) is refused and explained."""
    path, _ = _tiny_ckpt(tmp_path, "lstm_update_tele")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.LeakyReLU(0.1), nn.Linear(4, 3, bias=False))
    xb, yb = torch.rand(4, 5), torch.rand(4, 3)
    opt = LearnedOptimizer.from_checkpoint(path, model.parameters())
    opt.zero_grad()
    (0.5 * (model(xb) - yb).pow(2).sum()).backward()
    opt.step()
    with pytest.raises(ValueError, match="inputs is an empty batch"):
        opt.teleport(model, torch.rand(0, 5))
    bad = xb.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="inputs contain NaN or inf"):
        opt.teleport(model, bad)
    with pytest.raises(ValueError, match="inputs have 6 features per sample"):
        opt.teleport(model, torch.rand(4, 6))
    with pytest.raises(TypeError, match="model parameters are torch.float16"):
        opt.teleport(copy.deepcopy(model).half(), xb.half())
    # batch 40 > hidden width 4: the action is approximate, the outputs would move; the model is left alone
    big = torch.rand(40, 5)
    W0 = [p.detach().clone() for p in model.parameters()]
    assert opt.teleport(model, big) is False
    assert "outputs on the batch would move" in opt.last_teleport_rejected
    assert all(torch.equal(a, p) for a, p in zip(W0, model.parameters()))
    assert opt.teleport(model, xb) is True and opt.last_teleport_rejected is None
