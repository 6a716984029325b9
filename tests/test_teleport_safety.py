"""Issue 9, items 1-3: a teleport never wrecks the model (every action, learning rate and dtype), the default
rule is scale-free, the papers' raw rule stays available, and bad input gets a clear error."""
import copy
import math

import pytest
import torch
from torch import nn

import metatele
from metatele.problems import regression_batch, train_seeds
from metatele.teleport import DEFAULT_MAX_COND, default_loss_tol, teleport_weights


def _net(d_in=10, hidden=10, d_out=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, d_out, bias=False)).to(dtype)


def _loss(model, x, y):
    with torch.no_grad():
        return float(0.5 * (model(x) - y).pow(2).sum())


def _assert_safe(rep, model, x, y, loss0, dtype):
    tol = default_loss_tol(dtype)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert _loss(model, x, y) <= loss0 * (1 + 2 * tol) + 1e-12
    assert all(float(c.max()) <= DEFAULT_MAX_COND for c in rep.cond)
    assert bool(torch.isfinite(rep.objective_after).all())


# ---------------------------------------------------------------- item 1: approximate action (batch > width)

@pytest.mark.parametrize("rule", [None, "raw"])
@pytest.mark.parametrize("batch,lrs", [(11, [1e-2]), (40, [1e-2, 1.0, 1e2, 1e6])])
def test_approximate_action_never_raises_the_loss(rule, batch, lrs):
    """Issue 9.1: batch 11 on a width-10 net, grad-norm ascent at lr 1e-2, raised the loss 18.3 -> 1.9e26; with
    batch 40 the loss rose 5x to 1e11x for every lr from 1e-2 to 1e6. The guard now covers approximate actions."""
    model0 = _net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 10, generator=g), torch.randn(batch, 3, generator=g)
    loss0 = _loss(model0, x, y)
    for lr in lrs:
        model = copy.deepcopy(model0)
        rep = metatele.teleport(model, x, y, objective="grad_norm", loss="mse", steps=10, lr=lr, rule=rule)
        assert rep.exactness.verdict == "approximate"
        _assert_safe(rep, model, x, y, loss0, torch.float32)
        # every refused step is accounted for, with its reason
        assert int(rep.steps_taken) + sum(int(v) for v in rep.rejected.values()) <= 10
        if int(rep.rolled_back):
            assert "rolled back 1 (" in rep.summary()


def test_approximate_action_default_still_ascends():
    model = _net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 10, generator=g), torch.randn(11, 3, generator=g)
    rep = metatele.teleport(model, x, y, steps=10)
    assert float(rep.objective_after) > 1.05 * float(rep.objective_before)
    assert float(rep.loss_after) <= float(rep.loss_before) * (1 + default_loss_tol(torch.float32))


# ---------------------------------------------------------------- item 2: exact / projection, large learning rates

@pytest.mark.parametrize("rule", [None, "raw"])
@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_exact_action_large_lr_keeps_conditioning_and_loss_float64(rule, lr):
    """Issue 9.2: on [20,20,20,20] in float64 lr 1e-3 / 1e-2 drove g to extreme conditioning (squared gradient
    norm 3.7e3 -> 5e12) and the loss drifted by up to 5.7e-5 relative."""
    b = regression_batch([20, 20, 20, 20], train_seeds(3), dtype=torch.float64)
    W, rep = teleport_weights(b.weights, b.X, b.Y, lr=lr, rule=rule, steps=10)
    assert rep.exactness.verdict == "exact"
    assert float(rep.loss_rel_change.max()) <= default_loss_tol(torch.float64)
    assert all(float(c.max()) <= DEFAULT_MAX_COND for c in rep.cond)
    assert all(bool(torch.isfinite(w).all()) for w in W)
    # the composed element is bounded, so the objective cannot explode: ||grad||^2 scales at most like cond^4
    assert float(rep.objective_ratio.max()) <= DEFAULT_MAX_COND ** 4
    assert bool((rep.objective_after >= rep.objective_before).all())


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 1.0, 1e3])
def test_projection_case_any_lr(lr):
    """Issue 9.2: (10 samples, 14 in, 10 hidden, 3 out) went to a squared gradient norm of 1.9e24."""
    torch.manual_seed(0)
    model0 = nn.Sequential(nn.Linear(14, 10, bias=False), nn.LeakyReLU(0.1), nn.Linear(10, 3, bias=False)).double()
    x, y = torch.randn(10, 14, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    loss0 = _loss(model0, x, y)
    for rule in (None, "raw"):
        model = copy.deepcopy(model0)
        rep = metatele.teleport(model, x, y, lr=lr, rule=rule, steps=10)
        assert rep.exactness.verdict in ("exact", "projection")
        _assert_safe(rep, model, x, y, loss0, torch.float64)
        assert float(rep.loss_rel_change) <= default_loss_tol(torch.float64)
        assert float(rep.objective_ratio) < 1e6


def test_default_rule_is_scale_free_where_raw_lr_is_too_small():
    """Issue 9.2: SGD's teleports on digits (raw teleport lr 1e-4) raised ||grad L||^2 only from 0.010094 to
    0.010096; the normalised default raises it meaningfully with the same call."""
    pytest.importorskip("sklearn")
    from metatele.data import load_dataset
    from metatele.experiments._common import make_model

    data = load_dataset("digits")
    x, y = data.train.X[:200].float(), data.train.y[:200]
    model0 = make_model([64, 16, 10, 10], 0)
    raw = metatele.teleport(copy.deepcopy(model0), x, y, loss="ce", lr=1e-4, rule="raw", steps=10)
    default = metatele.teleport(copy.deepcopy(model0), x, y, loss="ce", steps=10)
    assert float(raw.objective_ratio) < 1.01
    assert float(default.objective_ratio) > 1.3
    assert float(default.loss_after) <= float(default.loss_before) * (1 + default_loss_tol(torch.float32))


@pytest.mark.parametrize("method", ["GD", "AdaGrad"])
def test_raw_rule_still_ascends_at_the_papers_learning_rates(method):
    """P1's regression teleports (section 5: dims [4..8], GD: 8 steps at teleport lr 1e-7; AdaGrad: 2 steps at
    1e-5) still raise the objective with the raw rule. At initialisation (the experiment teleports at step 5)
    the unguarded raw rule runs to cond(g) ~1e18 and a squared gradient norm x1e166 with the loss lost; the
    conditioning guard stops it at the last good step."""
    from metatele.experiments.regression import DIMS, METHODS
    from metatele.problems import regression_problem

    _, _, tele_lr, tele_steps = METHODS[method]
    for seed in range(3):
        W, X, Y = regression_problem(DIMS, seed, dtype=torch.float64)
        _, rep = teleport_weights(W, X, Y, lr=tele_lr, rule="raw", steps=tele_steps)
        assert 1.1 < float(rep.objective_ratio) < 1e6
        assert set(rep.rejections()) <= {"ill_conditioned"} and int(rep.steps_taken) >= 1
        assert float(rep.loss_rel_change) <= default_loss_tol(torch.float64)


def test_report_counts_rejections_by_reason():
    b = regression_batch([20, 20, 20, 20], train_seeds(1), dtype=torch.float64)
    _, rep = teleport_weights(b.weights, b.X, b.Y, lr=1e-2, rule="raw", steps=3)
    assert rep.rejections() == {"ill_conditioned": 1}  # the first raw step already breaks the bound; it stops
    assert "group element too ill-conditioned: 1" in rep.summary()
    _, rep = teleport_weights(b.weights, b.X, b.Y, lr=1e-2, rule="raw", steps=3, max_cond=math.inf,
                              loss_tol=math.inf)
    assert int(rep.steps_taken) >= 1  # the guards can be switched off explicitly


# ---------------------------------------------------------------- item 3: input validation

def test_mse_targets_of_another_shape_name_both_shapes():
    model = _net()
    with pytest.raises(ValueError, match=r"targets have shape \(8,\) but the model's outputs have shape \(8, 3\)"):
        metatele.teleport(model, torch.randn(8, 10), torch.randn(8))
    with pytest.raises(ValueError, match=r"targets have shape \(8, 2\)"):
        metatele.teleport(model, torch.randn(8, 10), torch.randn(8, 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_and_targets(bad):
    model = _net()
    x, y = torch.randn(8, 10), torch.randn(8, 3)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="inputs contain NaN or inf"):
        metatele.teleport(model, x, y)
    y[1, 1] = bad
    with pytest.raises(ValueError, match="targets contain NaN or inf"):
        metatele.teleport(model, torch.randn(8, 10), y)


def test_class_labels_out_of_range():
    model = _net()
    with pytest.raises(ValueError, match=r"targets have class labels in \[0, 3\].*3 outputs"):
        metatele.teleport(model, torch.randn(8, 10), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]), loss="ce")
    with pytest.raises(ValueError, match=r"targets have class labels in \[-1, 2\]"):
        metatele.teleport(model, torch.randn(8, 10), torch.tensor([0, 1, 2, -1, 0, 1, 2, 0]), loss="ce")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(dtype):
    model = _net(dtype=dtype)
    with pytest.raises(TypeError, match=f"model parameters are {dtype}"):
        metatele.teleport(model, torch.randn(8, 10), torch.randn(8, 3))


def test_empty_batch():
    model = _net()
    with pytest.raises(ValueError, match="inputs is an empty batch"):
        metatele.teleport(model, torch.randn(0, 10), torch.randn(0, 3))


def test_non_finite_model():
    model = _net()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="model parameters contain NaN or inf"):
        metatele.teleport(model, torch.randn(8, 10), torch.randn(8, 3))


def test_teleport_weights_validation():
    b = regression_batch([20, 20, 20, 20], train_seeds(1), dtype=torch.float64)
    W, X, Y = b.weights, b.X, b.Y
    with pytest.raises(ValueError, match=r"Y has shape .* but the network's outputs have shape"):
        teleport_weights(W, X, Y[..., :1, :])
    Xn = X.clone()
    Xn[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        teleport_weights(W, Xn, Y)
    with pytest.raises(ValueError, match="X is an empty batch"):
        teleport_weights(W, X[..., :0], Y[..., :0])
    with pytest.raises(TypeError, match="weights are torch.float16"):
        teleport_weights(tuple(w.half() for w in W), X.half(), Y.half())
    with pytest.raises(ValueError, match="unknown rule"):
        teleport_weights(W, X, Y, rule="adam")
    with pytest.raises(ValueError, match="Y has class labels"):
        teleport_weights(W, X, torch.full((1, 20), 20), loss="ce")


@pytest.mark.parametrize("bias,action,param", [(False, "inverse", "I+T"), (True, "inverse", "exp"),
                                              (False, "linearised", "I+T")])
def test_closed_form_action_gradient_equals_autograd(bias, action, param):
    """The closed-form dS/dT of an exact action (speed: no autograd through the pseudo-inverses) equals
    autograd through the action."""
    from metatele.nets import init_linear
    from metatele.objectives import grad_norm_sq
    from metatele.symmetry import group_element, transform
    from metatele.teleport import exact_action_grad

    from metatele.symmetry import exactness

    g = torch.Generator().manual_seed(0)
    W = init_linear([6, 6, 6, 3], g, bias=bias, dtype=torch.float64)
    b = 6 + bias  # [X; 1] and [h; 1] are square
    X, Y = torch.randn(6, b, generator=g, dtype=torch.float64), torch.randn(3, b, generator=g, dtype=torch.float64)
    assert exactness(W, X, bias=bias).verdict == "exact"
    Ts = [torch.zeros(w.shape[-2], w.shape[-2], dtype=torch.float64, requires_grad=True) for w in W[:-1]]
    elems = Ts if action == "linearised" else [group_element(T, param) for T in Ts]
    s = grad_norm_sq(transform(W, X, elems, action=action, bias=bias), X, Y, bias=bias)
    ref = torch.autograd.grad(s, Ts)
    ws = tuple(w.clone().requires_grad_() for w in W)
    GW = torch.autograd.grad(grad_norm_sq(ws, X, Y, bias=bias), ws)
    got = exact_action_grad(W, X, GW, bias=bias)
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, rtol=1e-7, atol=1e-9)
    # and both equal finite differences (before grad_norm_sq took partial derivatives, autograd through the
    # action of a net with two hidden layers gave total ones: dS/dT_1 had the wrong sign here)
    E = torch.zeros(6, 6, dtype=torch.float64)
    E[2, 3] = 1.0
    eye = torch.eye(6, dtype=torch.float64)

    def s_at(t):
        el = [torch.zeros_like(eye), t * E] if action == "linearised" else [eye, group_element(t * E, param)]
        return float(grad_norm_sq(transform(W, X, el, action=action, bias=bias), X, Y, bias=bias).detach())
    fd = (s_at(1e-6) - s_at(-1e-6)) / 2e-6
    assert fd == pytest.approx(float(got[1][2, 3]), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_one_hidden_layer_closed_form_equals_autograd(bias, loss):
    """grad_norm_one_hidden (the teleport's fast path for one hidden layer under an exact action): the squared
    gradient norm, the loss and dS/dT equal autograd through the action, batched over initialisations."""
    from metatele.nets import ce_loss, init_linear, mse_loss
    from metatele.objectives import grad_norm_sq
    from metatele.symmetry import group_element, transform
    from metatele.teleport import grad_norm_one_hidden

    g = torch.Generator().manual_seed(0)
    W = init_linear([6, 6, 3], g, bias=bias, dtype=torch.float64, n_init=2)
    b = 6 + bias
    X = torch.randn(2, 6, b, generator=g, dtype=torch.float64)
    Y = (torch.randn(2, 3, b, generator=g, dtype=torch.float64) if loss == "mse"
         else torch.randint(0, 3, (2, b), generator=g))
    T = torch.zeros(2, 6, 6, dtype=torch.float64, requires_grad=True)
    s = grad_norm_sq(transform(W, X, [group_element(T)], bias=bias), X, Y, loss=loss, bias=bias)
    ref = torch.autograd.grad(s.sum(), T)[0]
    S, L, dT = grad_norm_one_hidden(W, X, Y, loss=loss, bias=bias)
    torch.testing.assert_close(S, s.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(L, (mse_loss if loss == "mse" else ce_loss)(W, X, Y, bias=bias), rtol=1e-12, atol=0)
    torch.testing.assert_close(dT[0], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule,lr", [(None, None), (None, 1e3), ("raw", 1e-2)])
def test_one_network_loop_equals_batched_loop(rule, lr):
    """The one-network loop (Python numbers) and the batched loop (tensor masks) take the same steps, reject the
    same ones for the same reasons, and end at the same weights."""
    b = regression_batch([20, 20, 20, 20], train_seeds(3), dtype=torch.float64)
    Wb, rb = teleport_weights(b.weights, b.X, b.Y, lr=lr, rule=rule, steps=6)
    for i in range(3):
        Wi, ri = teleport_weights(tuple(w[i] for w in b.weights), b.X[i], b.Y[i], lr=lr, rule=rule, steps=6)
        assert int(ri.steps_taken) == int(rb.steps_taken[i])
        assert {k: int(v) for k, v in ri.rejected.items()} == {k: int(v[i]) for k, v in rb.rejected.items()}
        assert all(torch.allclose(a[i], c, rtol=1e-9, atol=1e-12) for a, c in zip(Wb, Wi))
        assert float(ri.objective_after) == pytest.approx(float(rb.objective_after[i]), rel=1e-9)
