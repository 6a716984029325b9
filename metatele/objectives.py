"""Teleport objectives and metrics: squared gradient norm, sharpness, curvature (docs/mathematics.md, section 4).

All functions take a weight tuple ``W_i (..., out_i, in_i[+1])`` and column data ``X (..., d_in, b)``
(see :mod:`metatele.nets`) and return one value per initialisation, shape ``(...)``. They are
differentiable in the weights, so a teleport can ascend or descend them over the group element.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .nets import DEFAULT_SLOPE, augment, leaky_relu, leaky_relu_grad, loss_fn
from .symmetry.actions import transform

__all__ = [
    "SHARPNESS_RADII",
    "DIRECTIONS",
    "grad_norm_sq",
    "sample_directions",
    "sharpness",
    "curve_curvature",
    "sample_lie_directions",
    "curve_derivatives",
    "curvature",
    "make_objective",
    "OBJECTIVES",
]

#: P2's sharpness radii (20 each): MNIST 0.001 to 0.2 step 0.01; FashionMNIST and CIFAR-10 0.0001 to 0.02 step 0.001.
SHARPNESS_RADII: dict[str, tuple[float, ...]] = {
    "mnist": tuple(float(r) for r in np.arange(0.001, 0.2, 0.01)),
    "fashion_mnist": tuple(float(r) for r in np.arange(0.0001, 0.02, 0.001)),
    "cifar10": tuple(float(r) for r in np.arange(0.0001, 0.02, 0.001)),
}

#: Random-direction distributions: zero-mean Gaussian (sphere-uniform after normalisation; the default)
#: or the public code's all-positive U[0, 1) (docs/departures.md, section 2; kept as an option).
DIRECTIONS = ("gaussian", "uniform")


def _n_lead(weights: Sequence[Tensor]) -> int:
    return weights[-1].dim() - 2


def grad_norm_sq(weights: Sequence[Tensor], X: Tensor, Y: Tensor, *, loss: str = "mse",
                 slope: float = DEFAULT_SLOPE, bias: bool = False, create_graph: bool = True) -> Tensor:
    """``s(w) = ||grad_w L(w)||^2`` summed over all weights: the instantaneous ``-dL/dt`` of gradient flow.

    Returns shape ``(...)``. With ``create_graph=True`` the result is differentiable in ``weights``
    (needed to ascend it over a group element).
    """
    with torch.enable_grad():
        ws, wrt = partial_inputs(weights)
        L = loss_fn(loss)(ws, X, Y, slope=slope, bias=bias)
        grads = torch.autograd.grad(L.sum(), wrt, create_graph=create_graph)
    return sum(g.pow(2).sum(dim=(-2, -1)) for g in grads)


def partial_inputs(weights: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(ws, wrt)`` such that ``autograd.grad(f(ws), wrt)`` is the *partial* gradient of ``f`` in each weight.

    Weights that are themselves functions of one another (the output of a group action: ``W_1' `` depends on
    ``W_0'`` through the hidden layer the action reads) would give total derivatives if differentiated
    directly; a zero perturbation per weight, ``ws_i = W_i + 0_i``, isolates each one while keeping ``ws``
    differentiable in whatever ``W`` depends on."""
    if not any(w.requires_grad for w in weights):
        ws = tuple(w.detach().requires_grad_() for w in weights)
        return ws, ws
    zeros = tuple(torch.zeros_like(w, requires_grad=True) for w in weights)
    return tuple(w + z for w, z in zip(weights, zeros)), zeros


def _draw(shape, generator, kind: str, dtype, device) -> Tensor:
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if kind == "uniform":
        return torch.rand(shape, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"unknown direction distribution {kind!r}; allowed: {DIRECTIONS}")


def sample_directions(like: Sequence[Tensor], n: int, generator: torch.Generator | None = None,
                      kind: str = "gaussian") -> list[tuple[Tensor, ...]]:
    """``n`` random directions in weight space, each a tuple shaped like ``like`` with unit norm over all
    weights of one initialisation (``||u|| = 1`` per leading index)."""
    out = []
    for _ in range(n):
        u = [_draw(w.shape, generator, kind, w.dtype, w.device) for w in like]
        norm = torch.sqrt(sum(v.pow(2).sum(dim=(-2, -1)) for v in u))
        out.append(tuple(v / norm.reshape(*norm.shape, 1, 1) for v in u))
    return out


def sharpness(weights: Sequence[Tensor], X: Tensor, Y: Tensor, *, loss: str = "ce",
              radii: Sequence[float] = SHARPNESS_RADII["mnist"], n_dirs: int = 1,
              generator: torch.Generator | None = None, directions: str = "gaussian",
              dirs: Sequence[Sequence[Tensor]] | None = None, slope: float = DEFAULT_SLOPE,
              bias: bool = False) -> Tensor:
    """Sharpness ``phi(w) = mean_{t, u} L(w + t u / ||u||)`` over the radii ``t`` and ``n_dirs`` random
    directions ``u`` per radius (P2 section 4; the mean really divides by the number of terms,
    docs/departures.md, section 3).

    ``dirs``: optional precomputed unit directions (``len(radii) * n_dirs`` tuples), e.g. to keep them fixed
    while a teleport differentiates ``phi`` over the group element. Returns shape ``(...)``.
    """
    radii = list(radii)
    if not radii or any(r < 0 for r in radii):
        raise ValueError(f"radii must be a non-empty list of non-negative numbers, got {radii}")
    if n_dirs < 1:
        raise ValueError(f"n_dirs must be >= 1, got {n_dirs}")
    n = len(radii) * n_dirs
    if dirs is None:
        dirs = sample_directions(weights, n, generator, directions)
    if len(dirs) != n:
        raise ValueError(f"need {n} directions (radii x n_dirs), got {len(dirs)}")
    f = loss_fn(loss)
    total = 0.0
    for j, u in enumerate(dirs):
        t = radii[j // n_dirs]
        total = total + f(tuple(w + t * d for w, d in zip(weights, u)), X, Y, slope=slope, bias=bias)
    return total / n


def curve_curvature(g1: Sequence[Tensor], g2: Sequence[Tensor], n_lead: int | None = None) -> Tensor:
    """Curvature ``kappa = sqrt(|g1|^2 |g2|^2 - <g1, g2>^2) / |g1|^3`` of a curve with first and second
    derivatives ``g1``, ``g2`` (tuples of weight-shaped tensors, flattened together), shape ``(...)``."""
    if n_lead is None:
        n_lead = g1[-1].dim() - 2
    a = torch.cat([t.reshape(*t.shape[:n_lead], -1) for t in g1], -1)
    c = torch.cat([t.reshape(*t.shape[:n_lead], -1) for t in g2], -1)
    aa, cc, ac = (a * a).sum(-1), (c * c).sum(-1), (a * c).sum(-1)
    return torch.sqrt((aa * cc - ac * ac).clamp_min(0)) / aa.pow(1.5)


def sample_lie_directions(weights: Sequence[Tensor], n_curves: int | None = None,
                          generator: torch.Generator | None = None, kind: str = "gaussian") -> list[Tensor]:
    """One random ``M_i`` per hidden layer with ``||M_i||_F = 1``: shape ``([n_curves,] ..., k_i, k_i)``."""
    lead = weights[-1].shape[:-2]
    front = () if n_curves is None else (n_curves,)
    Ms = []
    for W in weights[:-1]:
        k = W.shape[-2]
        M = _draw((*front, *lead, k, k), generator, kind, W.dtype, W.device)
        Ms.append(M / torch.linalg.matrix_norm(M).unsqueeze(-1).unsqueeze(-1))
    return Ms


def _pad_bias(M: Tensor, bias: bool) -> Tensor:
    """``M (.., k, k)`` acting on the columns of the next weight: with a bias column, ``blockdiag(M, 0)``."""
    return torch.nn.functional.pad(M, (0, 1, 0, 1)) if bias else M


def _closed_form(weights, X, Ms, slope, bias, cross: bool):
    g1 = [torch.zeros_like(W) for W in weights]
    g2 = [torch.zeros_like(W) for W in weights]
    h = X
    for i, M in enumerate(Ms):
        V, U = weights[i], weights[i + 1]
        ha = augment(h) if bias else h
        hp = torch.linalg.pinv(ha)
        Z = V @ ha
        S, Sp = leaky_relu(Z, slope), leaky_relu_grad(Z, slope)
        MS = M @ S
        A1 = (MS / Sp) @ hp                     # d/dt sigma^{-1}(e^{tM} sigma(Vh)) h^+ at t = 0
        A2 = ((M @ MS) / Sp) @ hp               # second derivative (sigma^{-1}'' = 0 for LeakyReLU)
        Mh = _pad_bias(M, bias)
        g1[i] = g1[i] + A1
        g2[i] = g2[i] + A2
        if cross and i > 0:                     # middle weight: -2 A1_i blockdiag(M_{i-1}, 0)
            g2[i] = g2[i] - 2 * A1 @ _pad_bias(Ms[i - 1], bias)
        g1[i + 1] = g1[i + 1] - U @ Mh          # U e^{-tM}
        g2[i + 1] = g2[i + 1] + U @ (Mh @ Mh)
        h = leaky_relu(Z, slope)
    return tuple(g1), tuple(g2)


def _autograd_form(weights, X, Ms, slope, bias):
    """Reference derivatives of the curve by reverse-mode autograd (the double-vjp form of a jvp).

    Nested *forward*-mode AD is avoided on purpose: in torch 2.14 the second-order forward derivative of
    ``torch.linalg.solve`` is wrong (checked against ``inv`` and reverse mode), while reverse mode is right.
    """
    def curve(t):
        gs = [torch.linalg.matrix_exp(t * M) for M in Ms]
        return transform(weights, X, gs, action="inverse", slope=slope, bias=bias, validate=False)

    def first(t):
        return torch.autograd.functional.jvp(curve, t, torch.ones_like(t), create_graph=True)[1]

    t0 = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)
    with torch.enable_grad():
        g1 = first(t0)
        g2 = torch.autograd.functional.jvp(first, t0, torch.ones_like(t0))[1]
    return tuple(t.detach() for t in g1), tuple(t.detach() for t in g2)


def curve_derivatives(weights: Sequence[Tensor], X: Tensor, Ms: Sequence[Tensor], *,
                      method: str = "closed", slope: float = DEFAULT_SLOPE,
                      bias: bool = False) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """First and second derivatives at ``t = 0`` of the curve ``gamma_M(t) = exp(t M) . w`` (inverse-form
    action on every hidden layer at once, one ``M_i (..., k_i, k_i)`` per hidden layer).

    ``method``:
      * ``"closed"`` (default): P2's closed forms, U part ``-U M``, ``U M^2``; V part
        ``[(M sigma(Vh)) / sigma'(Vh)] h^+`` and ``[(M^2 sigma(Vh)) / sigma'(Vh)] h^+``; plus, for a middle
        weight, the cross term ``-2 [(M_m sigma(W_m h_m)) / sigma'(W_m h_m)] h_m^+ M_{m-1}``
        (docs/mathematics.md, section 4.4).
      * ``"paper"``: the public code's closed form without the cross term (docs/departures.md, section 5),
        to reproduce Table 1.
      * ``"autograd"``: autograd of the curve itself (reference; one curve at a time; not differentiable).

    ``Ms`` may carry extra leading dimensions (e.g. several curves) that broadcast against the weights.
    """
    if len(Ms) != len(weights) - 1:
        raise ValueError(f"need one M per hidden layer ({len(weights) - 1}), got {len(Ms)}")
    if method == "closed":
        return _closed_form(weights, X, Ms, slope, bias, cross=True)
    if method == "paper":
        return _closed_form(weights, X, Ms, slope, bias, cross=False)
    if method == "autograd":
        return _autograd_form(weights, X, Ms, slope, bias)
    raise ValueError(f"unknown curvature method {method!r}; allowed: 'closed', 'paper', 'autograd'")


def curvature(weights: Sequence[Tensor], X: Tensor, *, n_curves: int = 200,
              generator: torch.Generator | None = None, method: str = "closed", directions: str = "gaussian",
              Ms: Sequence[Tensor] | None = None, slope: float = DEFAULT_SLOPE, bias: bool = False) -> Tensor:
    """Curvature of the minimum ``psi(w)``: mean ``kappa`` over ``n_curves`` random curves ``exp(t M) . w``
    in the level set, ``||M_i||_F = 1`` (P2 section 5; 200 curves in the paper). Returns shape ``(...)``.

    ``Ms``: optional fixed directions ``(n_curves, ..., k_i, k_i)`` per hidden layer (e.g. from
    :func:`sample_lie_directions`), so that ``psi`` is a deterministic function of the weights.
    """
    if len(weights) < 2:
        raise ValueError("curvature of the minimum needs at least one hidden layer")
    if Ms is None:
        if n_curves < 1:
            raise ValueError(f"n_curves must be >= 1, got {n_curves}")
        Ms = sample_lie_directions(weights, n_curves, generator, directions)
    n_lead = _n_lead(weights) + 1
    if method == "autograd":
        kappas = []
        for c in range(Ms[0].shape[0]):
            g1, g2 = curve_derivatives(weights, X, [M[c] for M in Ms], method="autograd", slope=slope, bias=bias)
            kappas.append(curve_curvature(g1, g2, n_lead - 1))
        return torch.stack(kappas).mean(0)
    g1, g2 = curve_derivatives(weights, X, Ms, method=method, slope=slope, bias=bias)
    return curve_curvature(g1, g2, n_lead).mean(0)


# ----------------------------------------------------------------------------- objective factory

OBJECTIVES = ("grad_norm", "sharpness", "curvature")


def make_objective(name: str | Callable, *, loss: str = "mse", slope: float = DEFAULT_SLOPE,
                   bias: bool = False, generator: torch.Generator | None = None,
                   **kwargs) -> Callable[[Sequence[Tensor], Tensor, Tensor], Tensor]:
    """A function ``objective(weights, X, Y) -> (...)`` for a teleport.

    Random directions (sharpness) and Lie-algebra curves (curvature) are drawn once, on the first call,
    and then kept fixed, so the objective is a deterministic, differentiable function of the weights.
    ``kwargs`` go to :func:`sharpness` (``radii``, ``n_dirs``, ``directions``) or :func:`curvature`
    (``n_curves``, ``method``, ``directions``). A callable ``name`` is returned unchanged.
    """
    if callable(name):
        return name
    if name == "grad_norm":
        if kwargs:
            raise ValueError(f"grad_norm takes no extra options, got {sorted(kwargs)}")
        return lambda w, X, Y: grad_norm_sq(w, X, Y, loss=loss, slope=slope, bias=bias)
    if name == "sharpness":
        radii = list(kwargs.pop("radii", SHARPNESS_RADII["mnist"]))
        n_dirs = int(kwargs.pop("n_dirs", 1))
        kind = kwargs.pop("directions", "gaussian")
        if kwargs:
            raise ValueError(f"unknown sharpness options {sorted(kwargs)}; allowed: radii, n_dirs, directions")
        cache: dict = {}

        def phi(w, X, Y):
            if "dirs" not in cache:
                cache["dirs"] = sample_directions(tuple(t.detach() for t in w), len(radii) * n_dirs,
                                                  generator, kind)
            return sharpness(w, X, Y, loss=loss, radii=radii, n_dirs=n_dirs, dirs=cache["dirs"],
                             slope=slope, bias=bias)
        return phi
    if name == "curvature":
        n_curves = int(kwargs.pop("n_curves", 200))
        method = kwargs.pop("method", "closed")
        kind = kwargs.pop("directions", "gaussian")
        if kwargs:
            raise ValueError(f"unknown curvature options {sorted(kwargs)}; allowed: n_curves, method, directions")
        cache = {}

        def psi(w, X, Y):
            if "Ms" not in cache:
                cache["Ms"] = sample_lie_directions(w, n_curves, generator, kind)
            return curvature(w, X, Ms=cache["Ms"], method=method, slope=slope, bias=bias)
        return psi
    raise ValueError(f"unknown objective {name!r}; allowed: {OBJECTIVES} or a callable")
