"""metatele.optim: the wrapper is the bare optimiser when nothing is scheduled; scheduled teleports raise the
gradient norm on their batch; each state policy does what its docstring says, checked against independent
references (explicit group-action formulas, finite differences, freshly built optimisers)."""
import copy

import pytest
import torch
from torch import nn

from metatele.nets import from_sequential, init_linear, to_sequential
from metatele.optim import (P2_OPTIMIZERS, TeleportingOptimizer, TeleportSchedule, TeleportSettings,
                            make_optimizer, p2_teleport_config, pushforward)
from metatele.symmetry import transform


def mlp(widths, seed=0, slope=0.1, bias=False, dtype=torch.float32):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.LeakyReLU(slope))
        layers.append(nn.Linear(a, b, bias=bias))
    m = nn.Sequential(*layers).to(dtype)
    to_sequential(tuple(w.to(dtype) for w in init_linear(widths, torch.Generator().manual_seed(seed), bias=bias)), m)
    return m


def data(n, d, c=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def train(model, opt, X, y, steps=12, batch=5, teleport_at=()):
    for s in range(steps):
        j = torch.arange(s * batch, (s + 1) * batch) % len(y)
        if hasattr(opt, "start_batch"):
            opt.start_batch(0, s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[j]), y[j]).backward()
        opt.step()


OPTIMISERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_no_teleport_is_bit_identical(name):
    X, y = data(60, 12)
    ref = mlp([12, 8, 6, 4], bias=True)
    wrapped_model = copy.deepcopy(ref)
    bare = OPTIMISERS[name](ref.parameters())
    never = TeleportSchedule(epochs=(5,), per_epoch=8, steps=(999,))  # scheduled, but never reached
    wrapped = TeleportingOptimizer(wrapped_model, OPTIMISERS[name](wrapped_model.parameters()), schedule=never,
                                   batches=lambda: (X[:5], y[:5]))
    train(ref, bare, X, y)
    train(wrapped_model, wrapped, X, y)
    for a, b in zip(ref.parameters(), wrapped_model.parameters()):
        assert torch.equal(a, b)
    assert wrapped.events == [] and wrapped.step_count == 12


def grad_norm_sq(model, X, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    return sum(float(p.grad.pow(2).sum()) for p in model.parameters())


def test_scheduled_teleport_raises_grad_norm_on_its_batch():
    torch.manual_seed(0)
    X, y = data(40, 12, dtype=torch.float64)
    tb = data(6, 12, seed=5, dtype=torch.float64)          # batch 6 <= every width: the action is exact
    model = mlp([12, 8, 7, 4], dtype=torch.float64)
    opt = TeleportingOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01),
                               schedule=TeleportSchedule(epochs=(0,), per_epoch=1),
                               settings=TeleportSettings(lr=0.5, steps=10), batches=lambda: tb)
    before = copy.deepcopy(model)
    ev = opt.start_batch(0, 0)
    assert ev is not None and opt.start_batch(0, 1) is None
    g0, g1 = grad_norm_sq(before, *tb), grad_norm_sq(model, *tb)
    assert g1 > 1.05 * g0
    assert ev.objective_before == pytest.approx(g0, rel=1e-9) and ev.objective_after == pytest.approx(g1, rel=1e-9)
    with torch.no_grad():
        l0 = nn.functional.cross_entropy(before(tb[0]), tb[1])
        l1 = nn.functional.cross_entropy(model(tb[0]), tb[1])
    assert float(l1) == pytest.approx(float(l0), rel=1e-9)   # on its batch, a teleport keeps the loss
    assert ev.exactness in ("exact", "projection")


def teleported(name, policy, *, slope=0.1, action="inverse", dtype=torch.float64, bias=False):
    """Train 5 steps, then teleport once with ``policy``; returns (model, opt, state before teleport, X_tele)."""
    X, y = data(40, 12, dtype=dtype)
    tb = data(6, 12, seed=7, dtype=dtype)
    model = mlp([12, 8, 7, 4], slope=slope, dtype=dtype, bias=bias)
    opt = TeleportingOptimizer(model, OPTIMISERS[name](model.parameters()),
                               schedule=TeleportSchedule(epochs=(), per_epoch=0, steps=(5,)),
                               settings=TeleportSettings(lr=0.2, steps=5, action=action), batches=lambda: tb,
                               state_policy=policy)
    train(model, opt, X, y, steps=5)
    state = copy.deepcopy(opt.optimizer.state_dict())
    W_before, _, _ = from_sequential(model)
    opt.start_batch(0, 5)
    return model, opt, state, W_before, tb


def test_reset_equals_a_freshly_built_optimiser():
    model, opt, _, _, _ = teleported("adam", "reset")
    assert len(opt.optimizer.state) == 0
    fresh_model = copy.deepcopy(model)
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=0.01)
    X, y = data(10, 12, seed=3, dtype=torch.float64)
    for m, o in ((model, opt), (fresh_model, fresh)):
        o.zero_grad()
        nn.functional.cross_entropy(m(X), y).backward()
        o.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["momentum", "adagrad", "adam"])
def test_keep_leaves_state_untouched(name):
    model, opt, state, W_before, _ = teleported(name, "keep")
    after = opt.optimizer.state_dict()
    for k, st in state["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(v))
    W_after, _, _ = from_sequential(model)
    assert any(not torch.equal(a, b) for a, b in zip(W_before, W_after))  # the weights did move
    assert sorted(opt.events[0].kept_keys) == sorted({k for st in state["state"].values() for k in st})


def test_transform_momentum_linear_action_matches_formula():
    # sigma = identity and the linear action: W_0 -> G0 W_0, W_1 -> G1 W_1 G0^{-1}, W_2 -> W_2 G1^{-1};
    # a velocity transforms the same way (the action is linear in the weights)
    model, opt, state, W_before, _ = teleported("momentum", "transform", slope=1.0, action="linear")
    G0, G1 = opt.last_report.elements
    ps = list(model.parameters())
    m_old = [state["state"][i]["momentum_buffer"] for i in range(3)]
    expect = [G0 @ m_old[0], G1 @ m_old[1] @ torch.linalg.inv(G0), m_old[2] @ torch.linalg.inv(G1)]
    for p, e in zip(ps, expect):
        torch.testing.assert_close(opt.optimizer.state[p]["momentum_buffer"], e, rtol=1e-10, atol=1e-12)
    ev = opt.events[0]
    assert ev.transformed_keys == ["momentum_buffer"] and ev.composition_error < 1e-10


def test_transform_inverse_action_matches_finite_differences():
    model, opt, state, W_before, (Xt, _) = teleported("momentum", "transform", bias=True)
    ps = list(model.parameters())  # weight, bias per layer
    m_old = [torch.cat([state["state"][2 * i]["momentum_buffer"], state["state"][2 * i + 1]["momentum_buffer"][:, None]], 1)
             for i in range(3)]
    els = [e.double() for e in opt.last_report.elements]
    eps = 1e-6
    phi = lambda W: transform(W, Xt.T, els, action="inverse", slope=0.1, bias=True, validate=False)  # noqa: E731
    plus = phi(tuple(w + eps * m for w, m in zip(W_before, m_old)))
    minus = phi(tuple(w - eps * m for w, m in zip(W_before, m_old)))
    for i in range(3):
        fd = (plus[i] - minus[i]) / (2 * eps)
        new = torch.cat([opt.optimizer.state[ps[2 * i]]["momentum_buffer"],
                         opt.optimizer.state[ps[2 * i + 1]]["momentum_buffer"][:, None]], 1)
        torch.testing.assert_close(new, fd, rtol=1e-6, atol=1e-8)
    assert opt.events[0].composition_error < 1e-8   # batch 6 <= widths: the composed element reproduces it


def test_transform_adam_pushes_the_update_direction_and_keeps_second_moments():
    model, opt, state, W_before, _ = teleported("adam", "transform", slope=1.0, action="linear")
    G0, G1 = opt.last_report.elements
    ps = list(model.parameters())
    old = state["state"]
    step = float(old[0]["step"])
    b1, b2 = 0.9, 0.999
    d = [(old[i]["exp_avg_sq"] / (1 - b2 ** step)).sqrt() + 1e-8 for i in range(3)]
    u = [old[i]["exp_avg"] / (1 - b1 ** step) / d[i] for i in range(3)]
    pushed = [G0 @ u[0], G1 @ u[1] @ torch.linalg.inv(G0), u[2] @ torch.linalg.inv(G1)]
    for i, p in enumerate(ps):
        st = opt.optimizer.state[p]
        assert torch.equal(st["exp_avg_sq"], old[i]["exp_avg_sq"]) and float(st["step"]) == step
        new_u = st["exp_avg"] / (1 - b1 ** step) / d[i]
        torch.testing.assert_close(new_u, pushed[i], rtol=1e-9, atol=1e-12)
    assert opt.events[0].transformed_keys == ["exp_avg"]
    assert set(opt.events[0].kept_keys) == {"exp_avg_sq", "step"}


def test_transform_keeps_adagrad_sums():
    model, opt, state, _, _ = teleported("adagrad", "transform")
    for i, p in enumerate(model.parameters()):
        assert torch.equal(opt.optimizer.state[p]["sum"], state["state"][i]["sum"])
    assert opt.events[0].transformed_keys == [] and "sum" in opt.events[0].kept_keys


def test_pushforward_linear_is_exact():
    g = torch.Generator().manual_seed(0)
    W = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in [(5, 4), (3, 5)])
    v = tuple(torch.randn(w.shape, generator=g, dtype=torch.float64) for w in W)
    G = torch.eye(5, dtype=torch.float64) + 0.1 * torch.randn(5, 5, generator=g, dtype=torch.float64)
    img, jv = pushforward(W, v, torch.randn(4, 3, generator=g, dtype=torch.float64), [G], action="linear", slope=1.0)
    torch.testing.assert_close(jv[0], G @ v[0])
    torch.testing.assert_close(jv[1], v[1] @ torch.linalg.inv(G))


def test_p2_defaults_and_schedule():
    for name, (epochs, lr) in {"sgd": ((2,), 1e-4), "adagrad": ((2,), 1e-4), "momentum": ((0,), 5e-2),
                               "rmsprop": ((0,), 5e-2), "adam": ((0,), 5e-2)}.items():
        sch, st = p2_teleport_config(name)
        assert sch.epochs == epochs and sch.per_epoch == 8 and sch.batch_size == 200
        assert st.lr == lr and st.steps == 10 and st.objective == "grad_norm" and st.maximize
    p = [nn.Parameter(torch.zeros(2))]
    lrs = {n: make_optimizer(n, p, 1e-2).param_groups[0]["lr"] for n in P2_OPTIMIZERS}
    assert lrs == pytest.approx({"sgd": 1e-2, "adagrad": 1e-2, "momentum": 1e-3, "rmsprop": 1e-4, "adam": 1e-4})
    assert make_optimizer("momentum", p).param_groups[0]["momentum"] == 0.9
    s = TeleportSchedule(epochs=(2,), per_epoch=8, steps=(100,))
    assert s.due(2, 7, 0) and not s.due(2, 8, 0) and not s.due(1, 0, 0) and s.due(5, 50, 100)
    assert TeleportSchedule.never().empty


def test_bad_configuration_raises():
    model = mlp([4, 3, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="state policy"):
        TeleportingOptimizer(model, opt, state_policy="forget")
    with pytest.raises(ValueError, match="batches"):
        TeleportingOptimizer(model, opt, schedule=TeleportSchedule())
    with pytest.raises(ValueError, match="per_epoch"):
        TeleportSchedule(per_epoch=-1)
    with pytest.raises(ValueError, match="unknown optimiser"):
        make_optimizer("lbfgs", model.parameters())
    with pytest.raises(TypeError):
        TeleportingOptimizer(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), opt,
                             schedule=TeleportSchedule(), batches=lambda: None)


def test_teleport_skipped_on_nonfinite_weights():
    model = mlp([12, 8, 7, 4])
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    tb = data(6, 12, seed=5)
    opt = TeleportingOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               schedule=TeleportSchedule(epochs=(0,), per_epoch=1), batches=lambda: tb)
    ev = opt.start_batch(0, 0)
    assert ev.exactness.startswith("skipped") and ev.steps_taken == 0
