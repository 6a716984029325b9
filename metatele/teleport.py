"""Hand-designed teleportation: ascent or descent on an objective over the group element, and random
teleports, for weight tuples (batched over initialisations) and in place for ``nn.Sequential`` models.

Algorithm (P1 Algorithm 1; docs/mathematics.md, section 5): for ``steps`` steps, build ``g . w`` with ``T = 0``
(``g = I + T`` or ``exp(T)``, one ``T`` per hidden layer), compute the objective ``s(g . w)`` and
``ds/dT``, set ``T = +/- lr * ds/dT``, and move ``w`` to ``g . w`` with the *exact* action (the inverse
of ``g`` is solved, not approximated by ``I - T``). An initialisation whose objective has passed the
``cap`` stops (ascent: ``s >= cap``; descent: ``s <= cap``). Two guards beyond the papers, both reported:
``max_step_norm`` clips ``||T||_F`` of each step (``ds/dT`` scales with the loss, ~1e9 on the paper's
regression problems), and a step that would make an initialisation's weights non-finite, its ``g``
singular, or (for a loss-preserving action) change its loss by more than ``loss_tol`` relative (numerical
breakdown far from the identity) is rolled back for that initialisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .nets import DEFAULT_SLOPE, augment, check_weights, from_sequential, loss_fn, to_sequential
from .objectives import make_objective
from .symmetry.actions import ACTIONS, Exactness, exactness, transform
from .symmetry.group import PARAMETRISATIONS, group_element, identity_like, normalise

__all__ = ["TeleportReport", "teleport_weights", "random_teleport", "random_teleport_model", "teleport"]


@dataclass
class TeleportReport:
    """What a teleport did, one entry per initialisation (tensors of shape ``(...)``, 0-d for one net).

    ``rolled_back``: initialisations where a step was refused (non-finite weights, singular ``g``, or lost
    loss precision); their weights stay at the last good step.
    ``elements``: the composed group element applied to each hidden layer, ``(..., k_i, k_i)`` (for the
    ``linearised`` action: ``I + sum of the T's``, the first-order group element).
    """

    loss_before: Tensor
    loss_after: Tensor
    objective_before: Tensor
    objective_after: Tensor
    steps_taken: Tensor
    capped: Tensor
    rolled_back: Tensor
    exactness: Exactness
    elements: list[Tensor] = field(default_factory=list)

    @property
    def loss_rel_change(self) -> Tensor:
        """``|L_after - L_before| / |L_before|`` per initialisation."""
        return (self.loss_after - self.loss_before).abs() / self.loss_before.abs().clamp_min(1e-300)

    def summary(self) -> str:
        f = lambda t: f"{float(t.double().mean()):.6g}"  # noqa: E731
        return (f"teleport: objective {f(self.objective_before)} -> {f(self.objective_after)}, loss "
                f"{f(self.loss_before)} -> {f(self.loss_after)} (rel. change {f(self.loss_rel_change)}), "
                f"steps {f(self.steps_taken)}, capped {int(self.capped.sum())}, rolled back "
                f"{int(self.rolled_back.sum())}, action exactness: {self.exactness.verdict}")


def _check_action(action: str, param: str) -> None:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; allowed: {ACTIONS}")
    if param not in PARAMETRISATIONS:
        raise ValueError(f"unknown group parametrisation {param!r}; allowed: {PARAMETRISATIONS}")


def _elements(Ts: Sequence[Tensor], action: str, param: str) -> list[Tensor]:
    """What ``transform`` takes for these ``T``'s: ``T`` itself for ``linearised``, else ``g(T)``."""
    return list(Ts) if action == "linearised" else [group_element(T, param) for T in Ts]


def _as_matrix(e: Tensor, action: str) -> Tensor:
    return identity_like(e) + e if action == "linearised" else e


def _finite_per_init(weights: Sequence[Tensor], n_lead: int) -> Tensor:
    ok = None
    for w in weights:
        f = torch.isfinite(w).reshape(*w.shape[:n_lead], -1).all(-1)
        ok = f if ok is None else ok & f
    return ok


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.reshape(*mask.shape, 1, 1), a, b)


def teleport_weights(weights: Sequence[Tensor], X: Tensor, Y: Tensor, *,
                     objective: str | Callable = "grad_norm", maximize: bool = True, loss: str = "mse",
                     steps: int = 10, lr: float = 1e-3, cap: float | None = None, action: str = "inverse",
                     param: str = "I+T", slope: float = DEFAULT_SLOPE, bias: bool = False,
                     objective_kwargs: dict | None = None, generator: torch.Generator | None = None,
                     require_exact: bool = False, max_step_norm: float | None = None,
                     loss_tol: float = 1e-3, X_pinv: Tensor | None = None) -> tuple[tuple[Tensor, ...], TeleportReport]:
    """Teleport by gradient ascent (``maximize=True``) or descent on ``objective`` over the group element.

    ``weights``: ``W_i (..., out_i, in_i[+1])``; ``X (..., d_in, b)``; ``Y (..., d_out, b)`` (or integer
    labels ``(b,)`` / ``(..., b)`` for ``loss="ce"``). ``objective``: ``"grad_norm"`` (``||grad L||^2``,
    the default), ``"sharpness"``, ``"curvature"`` or a callable ``(weights, X, Y) -> (...)``;
    ``objective_kwargs`` are passed to :func:`metatele.objectives.make_objective`.
    ``require_exact``: raise ``ValueError`` if the action does not keep the loss on this batch
    (batch larger than a width, see :func:`metatele.symmetry.exactness`).
    ``max_step_norm``: clip each step's ``||T||_F`` to this value (None: no clipping, the papers' rule).
    ``loss_tol``: relative loss change above which a step of a loss-preserving action is rolled back.
    Returns ``(new_weights, report)``; the inputs are not modified.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    _check_action(action, param)
    if cap is not None and not math.isfinite(cap):
        raise ValueError(f"cap must be a finite number or None, got {cap!r}")
    if max_step_norm is not None and not (math.isfinite(max_step_norm) and max_step_norm > 0):
        raise ValueError(f"max_step_norm must be a finite number > 0 or None, got {max_step_norm!r}")
    if not loss_tol > 0:
        raise ValueError(f"loss_tol must be > 0, got {loss_tol!r}")
    check_weights(weights, X, bias=bias)
    if len(weights) < 2:
        raise ValueError("teleport needs at least one hidden layer (two weight matrices)")
    ex = exactness(weights, X, action=action, slope=slope, bias=bias)
    if require_exact and not ex.loss_preserving:
        raise ValueError(f"the {action!r} action is not exact on this batch ({'; '.join(ex.detail)}); use a "
                         f"batch no larger than the widths, or require_exact=False")
    obj = make_objective(objective, loss=loss, slope=slope, bias=bias, generator=generator,
                         **(objective_kwargs or {}))
    f_loss = loss_fn(loss)
    n_lead = weights[-1].dim() - 2
    W = tuple(w.detach() for w in weights)
    if X_pinv is None and action in ("inverse", "linearised"):
        X_pinv = torch.linalg.pinv(augment(X) if bias else X)  # the first pair's input never changes
    lead = W[-1].shape[:-2]
    widths = [w.shape[-2] for w in W[:-1]]
    dev, dt = W[0].device, W[0].dtype
    sign = 1.0 if maximize else -1.0

    with torch.no_grad():
        loss_before = f_loss(W, X, Y, slope=slope, bias=bias)
    steps_taken = torch.zeros(lead, dtype=torch.long, device=dev)
    capped = torch.zeros(lead, dtype=torch.bool, device=dev)
    rolled_back = torch.zeros(lead, dtype=torch.bool, device=dev)
    G = [torch.eye(k, dtype=dt, device=dev).expand(*lead, k, k).clone() for k in widths]
    obj_before = None
    for _ in range(steps):
        with torch.enable_grad():
            Ts = [torch.zeros(*lead, k, k, dtype=dt, device=dev, requires_grad=True) for k in widths]
            gW = transform(W, X, _elements(Ts, action, param), action=action, slope=slope, bias=bias,
                           X_pinv=X_pinv, validate=False)
            s = obj(gW, X, Y)
            dTs = torch.autograd.grad(s.sum(), Ts)
        s = s.detach()
        if obj_before is None:
            obj_before = s
        if cap is not None:
            capped |= (s >= cap) if maximize else (s <= cap)
        active = ~capped & ~rolled_back
        if not bool(active.any()):
            break
        with torch.no_grad():
            steps_T = [_where(active, sign * lr * d, torch.zeros_like(d)) for d in dTs]
            if max_step_norm is not None:
                steps_T = [t * (max_step_norm / torch.linalg.matrix_norm(t).clamp_min(max_step_norm))
                           .unsqueeze(-1).unsqueeze(-1) for t in steps_T]
            elems = _elements(steps_T, action, param)
            good = active.clone()
            for e in elems:
                m = _as_matrix(e, action)
                good &= torch.isfinite(m).reshape(*lead, -1).all(-1)
                if action != "linearised":
                    sv = torch.linalg.svdvals(torch.nan_to_num(m).double())
                    good &= sv[..., -1] > 1e-12 * sv[..., 0]
            safe = [_where(good, e, torch.zeros_like(e) if action == "linearised" else identity_like(e))
                    for e in elems]
            W_new = transform(W, X, safe, action=action, slope=slope, bias=bias, X_pinv=X_pinv,
                              validate=False)
            good &= _finite_per_init(W_new, n_lead)
            if ex.loss_preserving:
                L_new = f_loss(W_new, X, Y, slope=slope, bias=bias)
                good &= (L_new - loss_before).abs() <= loss_tol * loss_before.abs()
            rolled_back |= active & ~good
            W = tuple(_where(good, a, b) for a, b in zip(W_new, W))
            G = [_where(good, _as_matrix(e, action) @ g, g) for e, g in zip(safe, G)]
            steps_taken += good.long()

    with torch.no_grad():
        loss_after = f_loss(W, X, Y, slope=slope, bias=bias)
    obj_after = obj(W, X, Y).detach()
    if obj_before is None:  # steps == 0
        obj_before = obj_after
    report = TeleportReport(loss_before, loss_after, obj_before, obj_after, steps_taken, capped, rolled_back,
                            ex, G)
    return W, report


def random_teleport(weights: Sequence[Tensor], X: Tensor, Y: Tensor | None = None, *, magnitude: float = 0.01,
                    loss: str = "mse", action: str = "inverse", param: str = "I+T",
                    directions: str = "gaussian", slope: float = DEFAULT_SLOPE, bias: bool = False,
                    generator: torch.Generator | None = None) -> tuple[tuple[Tensor, ...], TeleportReport]:
    """Random teleport: ``g = I + magnitude R / ||R||_F`` (or ``exp`` of it) with random ``R`` per hidden
    layer, zero-mean Gaussian by default (``directions="uniform"``: the public code's U[0, 1),
    docs/departures.md, section 2).

    ``Y`` is only used to report the loss before and after (objective = squared gradient norm).
    """
    _check_action(action, param)
    if not (math.isfinite(magnitude) and magnitude >= 0):
        raise ValueError(f"magnitude must be a finite number >= 0, got {magnitude!r}")
    check_weights(weights, X, bias=bias)
    W = tuple(w.detach() for w in weights)
    lead = W[-1].shape[:-2]
    Ts = []
    for w in W[:-1]:
        k = w.shape[-2]
        shape = (*lead, k, k)
        if directions == "gaussian":
            R = torch.randn(shape, generator=generator, dtype=w.dtype, device=w.device)
        elif directions == "uniform":
            R = torch.rand(shape, generator=generator, dtype=w.dtype, device=w.device)
        else:
            raise ValueError(f"unknown direction distribution {directions!r}; allowed: 'gaussian', 'uniform'")
        Ts.append(normalise(R, magnitude))
    elems = _elements(Ts, action, param)
    W_new = transform(W, X, elems, action=action, slope=slope, bias=bias)
    n_lead = len(lead)
    good = _finite_per_init(W_new, n_lead)
    W_out = tuple(_where(good, a, b) for a, b in zip(W_new, W))
    nan = torch.full(lead, float("nan"), dtype=W[0].dtype, device=W[0].device)
    if Y is not None:
        f = loss_fn(loss)
        with torch.no_grad():
            lb, la = f(W, X, Y, slope=slope, bias=bias), f(W_out, X, Y, slope=slope, bias=bias)
        grad_norm = make_objective("grad_norm", loss=loss, slope=slope, bias=bias)
        ob, oa = grad_norm(W, X, Y).detach(), grad_norm(W_out, X, Y).detach()
    else:
        lb = la = ob = oa = nan
    report = TeleportReport(lb, la, ob, oa, good.long(), torch.zeros_like(good), ~good,
                            exactness(W, X, action=action, slope=slope, bias=bias),
                            [_where(good, _as_matrix(e, action), identity_like(_as_matrix(e, action)))
                             for e in elems])
    return W_out, report


def _module_data(inputs: Tensor, targets: Tensor, loss: str, dtype, device) -> tuple[Tensor, Tensor]:
    """PyTorch's ``(batch, features)`` to metatele's columns ``(features, batch)``."""
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be (batch, features...), got shape {tuple(inputs.shape)}")
    b = inputs.shape[0]
    X = inputs.reshape(b, -1).to(dtype=dtype, device=device).T
    if targets.shape[0] != b:
        raise ValueError(f"inputs have batch {b} but targets have {targets.shape[0]} rows")
    if loss == "ce":
        if targets.dim() != 1 or targets.is_floating_point():
            raise ValueError(f"loss='ce' needs integer class targets of shape (batch,), got "
                             f"{tuple(targets.shape)} {targets.dtype}")
        return X, targets.to(device)
    if loss == "mse":
        t = targets.reshape(b, -1) if targets.dim() != 1 else targets.reshape(b, 1)
        return X, t.to(dtype=dtype, device=device).T
    raise ValueError(f"unknown loss {loss!r}; allowed: 'mse', 'ce'")


def teleport(model: nn.Module, inputs: Tensor, targets: Tensor, *, objective: str | Callable = "grad_norm",
             loss: str = "mse", steps: int = 10, lr: float = 1e-3, maximize: bool = True,
             cap: float | None = None, action: str = "inverse", param: str = "I+T",
             objective_kwargs: dict | None = None, generator: torch.Generator | None = None,
             require_exact: bool = False) -> TeleportReport:
    """Teleport an ``nn.Sequential`` of ``nn.Linear`` and ``nn.LeakyReLU`` layers in place.

    ``inputs``: ``(batch, features)``; ``targets``: ``(batch, d_out)`` floats for ``loss="mse"``
    (``1/2`` the squared error summed over the batch) or ``(batch,)`` integer classes for ``loss="ce"``
    (cross-entropy, mean over the batch). Biases are handled as an extra input column of ones.
    ``objective``: ``"grad_norm"``, ``"sharpness"`` or ``"curvature"`` (``maximize`` picks the direction).
    If a step would make the weights non-finite it is not applied, and the report says so.
    """
    W, slope, bias = from_sequential(model)
    X, Y = _module_data(inputs, targets, loss, W[0].dtype, W[0].device)
    new, report = teleport_weights(W, X, Y, objective=objective, maximize=maximize, loss=loss, steps=steps,
                                   lr=lr, cap=cap, action=action, param=param, slope=slope, bias=bias,
                                   objective_kwargs=objective_kwargs, generator=generator,
                                   require_exact=require_exact)
    to_sequential(new, model)
    return report


def random_teleport_model(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
                          magnitude: float = 0.01, loss: str = "mse", action: str = "inverse",
                          param: str = "I+T", directions: str = "gaussian",
                          generator: torch.Generator | None = None) -> TeleportReport:
    """:func:`random_teleport` for an ``nn.Sequential`` of ``nn.Linear`` and ``nn.LeakyReLU``, in place.

    ``inputs (batch, features)`` define the data-dependent action; ``targets`` (optional, as in
    :func:`teleport`) only serve to report the loss before and after.
    """
    W, slope, bias = from_sequential(model)
    if targets is None:
        if inputs.dim() < 2:
            raise ValueError(f"inputs must be (batch, features...), got shape {tuple(inputs.shape)}")
        X, Y = inputs.reshape(inputs.shape[0], -1).to(dtype=W[0].dtype, device=W[0].device).T, None
    else:
        X, Y = _module_data(inputs, targets, loss, W[0].dtype, W[0].device)
    new, report = random_teleport(W, X, Y, magnitude=magnitude, loss=loss, action=action, param=param,
                                  directions=directions, slope=slope, bias=bias, generator=generator)
    to_sequential(new, model)
    return report
