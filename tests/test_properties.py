"""Property-based tests (hypothesis): the group actions keep the loss, and the teleport guard never lets a
teleport raise the loss beyond its tolerance or leave non-finite weights, for random shapes, batches, group
elements, learning rates, actions, rules and dtypes (issue 9, Tests)."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from metatele.nets import init_linear, mse_loss  # noqa: E402
from metatele.symmetry import exactness, group_element, transform  # noqa: E402
from metatele.teleport import default_loss_tol, teleport_weights  # noqa: E402

SETTINGS = dict(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def networks(draw, max_layers=4, max_width=8, batch=None):
    """``(weights, X, Y)`` in float64: 2-4 weight matrices, widths 2-8 (PyTorch's or the papers' U[0, 1)
    initialisation, rescaled), and a batch (by default at most the
    narrowest input or hidden width, so the inverse-form action is exact or a projection)."""
    n = draw(st.integers(2, max_layers))
    dims = draw(st.lists(st.integers(2, max_width), min_size=n + 1, max_size=n + 1))
    b = draw(st.integers(1, min(dims[:-1]))) if batch is None else draw(batch)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    W = init_linear(dims, g, bias=False, dtype=torch.float64)
    if draw(st.booleans()):  # the papers' all-positive U[0, 1) initialisation
        W = tuple(torch.rand(w.shape, generator=g, dtype=torch.float64) for w in W)
    W = tuple(w * draw(st.floats(0.3, 3.0)) for w in W)
    X = torch.randn(dims[0], b, generator=g, dtype=torch.float64)
    Y = torch.randn(dims[-1], b, generator=g, dtype=torch.float64)
    return W, X, Y


def _elements(draw, W, param):
    out = []
    for w in W[:-1]:
        k = w.shape[-2]
        seed = draw(st.integers(0, 2**31 - 1))
        T = torch.randn(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        T = T * (draw(st.floats(0.0, 0.5)) / torch.linalg.matrix_norm(T).clamp_min(1e-12))
        out.append(group_element(T, param))
    return out


@settings(**SETTINGS)
@given(data=st.data(), net=networks(), param=st.sampled_from(["I+T", "exp"]),
       action=st.sampled_from(["inverse", "pseudo_inverse"]))
def test_group_actions_keep_the_loss(data, net, param, action):
    W, X, Y = net
    ex = exactness(W, X, action=action)
    elems = _elements(data.draw, W, param)
    W1 = transform(W, X, elems, action=action)
    assert all(bool(torch.isfinite(w).all()) for w in W1)
    if ex.loss_preserving:  # rank-deficient random hidden layers can make it approximate: nothing to check
        L0, L1 = mse_loss(W, X, Y), mse_loss(W1, X, Y)
        assert float((L1 - L0).abs()) <= 1e-6 * float(L0.abs()) + 1e-9


@settings(**SETTINGS)
@given(data=st.data(), net=networks(), param=st.sampled_from(["I+T", "exp"]))
def test_linear_action_keeps_the_loss_of_linear_networks(data, net, param):
    W, X, Y = net
    elems = _elements(data.draw, W, param)
    W1 = transform(W, X, elems, action="linear", slope=1.0)
    L0, L1 = mse_loss(W, X, Y, slope=1.0), mse_loss(W1, X, Y, slope=1.0)
    assert float((L1 - L0).abs()) <= 1e-7 * float(L0.abs()) + 1e-9


@settings(**SETTINGS)
@given(net=networks(batch=st.integers(1, 12)),
       action=st.sampled_from(["inverse", "pseudo_inverse", "linearised"]),
       param=st.sampled_from(["I+T", "exp"]), rule=st.sampled_from(["normalized", "raw"]),
       log_lr=st.floats(-8, 6), dtype=st.sampled_from([torch.float32, torch.float64]),
       maximize=st.booleans(), steps=st.integers(1, 6))
def test_teleport_guard(net, action, param, rule, log_lr, dtype, maximize, steps):
    """Whatever the shapes, batch (exact, projection or approximate action), learning rate, rule and dtype, a
    teleport never raises the loss beyond its tolerance, never leaves non-finite weights, and keeps every
    composed group element within the conditioning bound."""
    W, X, Y = net
    W, X, Y = tuple(w.to(dtype) for w in W), X.to(dtype), Y.to(dtype)
    W1, rep = teleport_weights(W, X, Y, action=action, param=param, rule=rule, lr=10.0 ** log_lr, steps=steps,
                               maximize=maximize)
    assert all(bool(torch.isfinite(w).all()) for w in W1)
    L0 = float(mse_loss(W, X, Y).double())
    L1 = float(mse_loss(W1, X, Y).double())
    tol = default_loss_tol(dtype)
    slack = 4 * torch.finfo(dtype).eps * (abs(L0) + 1)  # the guard's own evaluation rounds too
    assert L1 - L0 <= tol * abs(L0) + slack
    if rep.exactness.loss_preserving:
        assert abs(L1 - L0) <= tol * abs(L0) + slack
    assert all(float(c.max()) <= rep.max_cond for c in rep.cond)
    assert math.isfinite(float(rep.objective_after))
    if rule == "normalized" and int(rep.steps_taken):  # every accepted normalised step improved the objective
        assert (float(rep.objective_after) > float(rep.objective_before)) == maximize
