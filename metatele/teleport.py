"""Hand-designed teleportation: ascent or descent on an objective over the group element, and random
teleports, for weight tuples (batched over initialisations) and in place for ``nn.Sequential`` models.

Algorithm (P1 Algorithm 1; docs/mathematics.md, section 5): for ``steps`` steps, build ``g . w`` with ``T = 0``
(``g = I + T`` or ``exp(T)``, one ``T`` per hidden layer), compute the objective ``s(g . w)`` and ``ds/dT``, take
a step ``T`` and move ``w`` to ``g . w`` with the *exact* action (the inverse of ``g`` is solved, not
approximated by ``I - T``). An initialisation whose objective has passed the ``cap`` stops.

Beyond the papers, every teleport is safe by default, whatever the action, learning rate and dtype:

* the default step rule is scale-free (``rule="normalized"``: steps of length ``||T||_F = lr`` along
  ``ds/dT``, accepted only if they improve the objective, with backtracking); the papers' ``T = lr ds/dT`` is
  ``rule="raw"``;
* a step that leaves non-finite weights, makes a composed group element ill-conditioned (``max_cond``) or moves
  the loss beyond a dtype-aware tolerance (``loss_tol``; upwards only for approximate actions) is rejected,
  and the report counts the rejections per reason;
* malformed input is a ``TypeError`` / ``ValueError`` naming the argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .nets import (DEFAULT_SLOPE, augment, ce_loss_from_logits, check_weights, from_sequential, leaky_relu, loss_fn,
                   to_sequential)
from .objectives import make_objective, partial_inputs
from .symmetry.actions import ACTIONS, Exactness, exactness, transform
from .symmetry.group import PARAMETRISATIONS, group_element, identity_like, normalise

__all__ = ["TeleportReport", "RULES", "DEFAULT_LR", "DEFAULT_MAX_COND", "REJECT_REASONS", "default_loss_tol",
           "check_teleport_data", "model_weights", "module_inputs", "teleport_weights", "random_teleport",
           "random_teleport_model", "teleport"]


#: Step rules of :func:`teleport_weights`: ``"normalized"`` (default, scale-free trust region with backtracking)
#: and ``"raw"`` (the papers' ``T = +/- lr * ds/dT``, P1 Algorithm 1).
RULES = ("normalized", "raw")
#: Default ``lr`` per rule: the length ``||T||_F`` of a normalised step, or the papers'-style raw learning rate.
DEFAULT_LR = {"normalized": 0.1, "raw": 1e-3}
#: Default bound on the condition number of the composed group element of each hidden layer.
DEFAULT_MAX_COND = 1e2
#: Why a step can be rejected (keys of :attr:`TeleportReport.rejected`).
REJECT_REASONS = ("non_finite", "ill_conditioned", "loss", "objective")
_REASON_TEXT = {"non_finite": "non-finite weights, objective or group element",
                "ill_conditioned": "group element too ill-conditioned",
                "loss": "loss rose beyond the tolerance", "objective": "objective did not improve"}
_HALF = (torch.float16, torch.bfloat16)


def default_loss_tol(dtype: torch.dtype) -> float:
    """Default relative loss tolerance of a teleport: ``3 sqrt(eps)`` of ``dtype`` (float32: 1.0e-3,
    float64: 4.5e-8), well above the rounding error of an exact action on a moderately conditioned batch
    (float32 ~1e-5, float64 ~1e-13) and far below the drift of a broken one."""
    return 3.0 * math.sqrt(torch.finfo(dtype).eps)


@dataclass
class TeleportReport:
    """What a teleport did, one entry per initialisation (tensors of shape ``(...)``, 0-d for one net).

    ``rolled_back``: initialisations where at least one step was rejected; their weights stay at the last
    accepted step (with ``rule="normalized"`` the step length is halved and the ascent goes on; with
    ``rule="raw"`` that initialisation stops).
    ``rejected``: for each reason in :data:`REJECT_REASONS`, how many steps of each initialisation were
    rejected for it (``non_finite``, ``ill_conditioned``: ``cond(g) > max_cond``, ``loss``: the loss moved
    beyond ``loss_tol``, ``objective``: a normalised step that did not improve the objective).
    ``elements``: the composed group element applied to each hidden layer, ``(..., k_i, k_i)`` (for the
    ``linearised`` action: ``I + sum of the T's``, the first-order group element).
    ``cond``: the condition number of each hidden layer's composed element (float64), ``(...)`` each.
    ``step_size``: with ``rule="normalized"``, the trust radius ``||T||_F`` at the end (halved per
    rejection); with ``rule="raw"``, ``lr``.
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
    rejected: dict[str, Tensor] = field(default_factory=dict)
    rule: str = "raw"
    loss_tol: float = math.nan
    max_cond: float = math.inf
    cond: list[Tensor] = field(default_factory=list)
    step_size: Tensor | None = None

    @property
    def loss_rel_change(self) -> Tensor:
        """``|L_after - L_before| / |L_before|`` per initialisation."""
        return (self.loss_after - self.loss_before).abs() / self.loss_before.abs().clamp_min(1e-300)

    @property
    def objective_gain(self) -> Tensor:
        """How much the objective rose, ``s_after - s_before``, per initialisation (negative: it fell)."""
        return self.objective_after - self.objective_before

    @property
    def objective_ratio(self) -> Tensor:
        """``s_after / s_before`` per initialisation."""
        return self.objective_after / self.objective_before

    def rejections(self) -> dict[str, int]:
        """Rejected steps per reason, summed over the initialisations (reasons with none left out)."""
        return {k: int(v.sum()) for k, v in self.rejected.items() if int(v.sum())}

    def summary(self) -> str:
        f = lambda t: f"{float(t.double().mean()):.6g}"  # noqa: E731
        rej = self.rejections()
        why = (" (" + ", ".join(f"{_REASON_TEXT.get(k, k)}: {n}" for k, n in rej.items()) + ")") if rej else ""
        return (f"teleport ({self.rule} steps): objective {f(self.objective_before)} -> "
                f"{f(self.objective_after)} (x{f(self.objective_ratio)}), loss {f(self.loss_before)} -> "
                f"{f(self.loss_after)} (rel. change {f(self.loss_rel_change)}), steps {f(self.steps_taken)}, "
                f"capped {int(self.capped.sum())}, rolled back {int(self.rolled_back.sum())}{why}, action "
                f"exactness: {self.exactness.verdict}")


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


def check_teleport_data(weights: Sequence[Tensor], X: Tensor, Y: Tensor | None, loss: str, *,
                        names: tuple[str, str, str] = ("weights", "X", "Y")) -> None:
    """Validate a teleport's weights and data, raising ``TypeError`` / ``ValueError`` that name the argument.

    Half precision (the loss guard cannot resolve a loss change in float16 / bfloat16), non-finite weights
    or data, an empty batch, MSE targets whose shape differs from the network's outputs, and class labels
    outside ``[0, classes)`` for ``loss="ce"``. ``names``: how the three arguments are called in messages.
    """
    nw, nx, ny = names
    for w in weights:
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise TypeError(f"{nw} must be floating-point tensors, got {getattr(w, 'dtype', type(w).__name__)}")
        if w.dtype in _HALF:
            raise TypeError(f"{nw} are {w.dtype}: teleport needs float32 or float64 (in half precision the "
                            f"group action and the loss guard cannot resolve the loss); convert with "
                            f".float() or .double()")
    if not isinstance(X, Tensor) or not X.is_floating_point():
        raise TypeError(f"{nx} must be a floating-point tensor, got {getattr(X, 'dtype', type(X).__name__)}")
    if X.shape[-1] == 0:
        raise ValueError(f"{nx} is an empty batch (shape {tuple(X.shape)}): a teleport needs at least one sample")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{nx} contains NaN or inf")
    for i, w in enumerate(weights):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{nw} contain NaN or inf (weight {i}): there is no level set to move along")
    if Y is None:
        return
    if not isinstance(Y, Tensor):
        raise TypeError(f"{ny} must be a tensor, got {type(Y).__name__}")
    b = X.shape[-1]
    d_out = weights[-1].shape[-2]
    if loss == "mse":
        if not Y.is_floating_point():
            raise TypeError(f"{ny} must be floating-point for loss='mse', got {Y.dtype}")
        if Y.dim() < 2 or tuple(Y.shape[-2:]) != (d_out, b):
            raise ValueError(f"{ny} has shape {tuple(Y.shape)} but the network's outputs have shape "
                             f"(..., {d_out}, {b}) (columns: outputs x batch); they must match")
        if not bool(torch.isfinite(Y).all()):
            raise ValueError(f"{ny} contains NaN or inf")
    elif loss == "ce":
        if Y.is_floating_point() or Y.is_complex() or Y.dtype == torch.bool:
            raise TypeError(f"{ny} must be integer class labels for loss='ce', got {Y.dtype}")
        if Y.shape[-1] != b:
            raise ValueError(f"{ny} has shape {tuple(Y.shape)}: its last dimension must be the batch {b}")
        if Y.numel() and (int(Y.min()) < 0 or int(Y.max()) >= d_out):
            raise ValueError(f"{ny} has class labels in [{int(Y.min())}, {int(Y.max())}] but the network has "
                             f"{d_out} outputs: labels must be in [0, {d_out - 1}]")
    else:
        raise ValueError(f"unknown loss {loss!r}; allowed: 'mse', 'ce'")


def _fast_loss(loss: str, slope: float, bias: bool) -> Callable:
    """``metatele.nets``' loss with ``torch.nn.functional.leaky_relu`` (one fused op with a fused backward; the
    same values, and the same derivatives except exactly at 0): the inner loop of a teleport differentiates it
    twice per step."""
    f = torch.nn.functional.leaky_relu

    def out(ws, X):
        h = X
        for w in ws[:-1]:
            h = f(w @ (augment(h) if bias else h), slope)
        return ws[-1] @ (augment(h) if bias else h)

    if loss == "mse":
        return lambda ws, X, Y: 0.5 * (Y - out(ws, X)).pow(2).sum(dim=(-2, -1))
    return lambda ws, X, Y: ce_loss_from_logits(out(ws, X), Y)


def grad_norm_one_hidden(weights: Sequence[Tensor], X: Tensor, Y: Tensor, *, loss: str = "mse",
                         slope: float = DEFAULT_SLOPE, bias: bool = False,
                         need_grad: bool = True) -> tuple[Tensor, Tensor, list[Tensor] | None]:
    """``(||grad L||^2, L, [dS/dT])`` for a network with one hidden layer ``(V, U)`` under an exact action, with
    no second-order autograd (docs/mathematics.md, section 5).

    An exact action keeps the output and the loss, so ``R = dL/df`` is invariant, the hidden layer becomes
    ``g Z`` and ``sigma'`` keeps its pattern ``D``; then ``grad_U L = R (g Z)^T`` and
    ``grad_V L = ((g^{-T} U^T R) * D) h^T``, and at ``g = I + T``, ``T = 0``:

    ``dS/dT = 2 A^T A - 2 B ((grad_V L h) * D)^T``,  ``A = grad_U L`` (first ``k`` columns), ``B = U^T R``.

    One forward and one backward pass (a GD step's work) instead of a double backward.
    """
    V, U = weights
    ha = augment(X) if bias else X
    pre = V @ ha
    Z = leaky_relu(pre, slope)
    Za = augment(Z) if bias else Z
    out = U @ Za
    if loss == "mse":
        r = out - Y
        L = 0.5 * r.pow(2).sum(dim=(-2, -1))
    else:
        logp = torch.log_softmax(out, dim=-2)
        labels = Y.expand(*out.shape[:-2], Y.shape[-1]).long()
        L = -torch.gather(logp, -2, labels.unsqueeze(-2)).squeeze(-2).mean(dim=-1)
        r = (logp.exp() - torch.nn.functional.one_hot(labels, out.shape[-2]).transpose(-1, -2).to(out.dtype))
        r = r / out.shape[-1]
    gU = r @ Za.mT
    k = V.shape[-2]
    B = U[..., :k].mT @ r
    pos = pre >= 0
    gV = torch.where(pos, B, B * slope) @ ha.mT
    S = gU.pow(2).sum(dim=(-2, -1)) + gV.pow(2).sum(dim=(-2, -1))
    if not need_grad:
        return S, L, None
    A = gU[..., :k]
    E = gV @ ha
    dT = 2 * (A.mT @ A) - 2 * (B @ torch.where(pos, E, E * slope).mT)
    return S, L, [dT]


def exact_action_grad(weights: Sequence[Tensor], X: Tensor, weight_grads: Sequence[Tensor], *,
                      X_pinv: Tensor | None = None, slope: float = DEFAULT_SLOPE, bias: bool = False) -> list[Tensor]:
    """``dS/dT_i`` at ``T = 0`` of ``S(g(T) . w)`` for an *exact* inverse-form (or linearised) action, from the
    weight gradient ``G = dS/dW`` at ``w`` (docs/mathematics.md, section 5):

    ``dS/dT_i = [(G_i (h_i^+)^T) / sigma'(W_i h_i)] sigma(W_i h_i)^T - U_i^T G_{i+1}``,

    ``h_i`` the input of layer ``i`` (``[h_i; 1]`` with a bias; square and invertible when the action is exact,
    so ``h_i^+ = h_i^{-1}`` and the derivative through the later pairs' inputs cancels), ``U_i`` the first
    ``k_i`` columns of ``W_{i+1}``. Equals autograd through :func:`metatele.symmetry.transform` (tested) without
    differentiating a pseudo-inverse. ``X_pinv``: the pseudo-inverse of the first layer's input, if cached.
    """
    out, h = [], X
    for i in range(len(weights) - 1):
        ha = augment(h) if bias else h
        pre = weights[i] @ ha
        Z = leaky_relu(pre, slope)
        G = weight_grads[i]
        A = G @ X_pinv.mT if (i == 0 and X_pinv is not None) else torch.linalg.solve(ha, G.mT).mT
        k = weights[i].shape[-2]
        A = torch.where(pre >= 0, A, A / slope)  # A / sigma'(W_i h_i)
        out.append(A @ Z.mT - weights[i + 1][..., :k].mT @ weight_grads[i + 1][..., :k])
        h = Z
    return out


def _teleport_loop_one(W, G, s_cur, L_cur, d_cur, loss_before, *, steps, rule, lr, sign, cap, maximize,
                       max_step_norm, max_cond, tol, tiny, loss_preserving, action, param, evaluate, step_bound, conds,
                       shrunk, apply):
    """The step loop of :func:`teleport_weights` for one network (no leading dimensions), with the guards and
    the backtracking in Python numbers. Same rules as the batched loop (tested to agree)."""
    s_f, L0 = float(s_cur), float(loss_before)
    lim = tol * (abs(L0) + tiny)
    rej = dict.fromkeys(REJECT_REASONS, 0)
    r, taken, was_capped, bound = lr, 0, False, 1.0
    for it in range(steps):
        if cap is not None and (s_f >= cap if maximize else s_f <= cap):
            was_capped = True
            break
        with torch.no_grad():
            if rule == "normalized":
                gn = math.sqrt(float(sum(d.pow(2).sum() for d in d_cur)))
                if gn == 0:
                    break  # stationary point: nothing to do
                Ts = [d * (sign * r / gn) for d in d_cur]
                tmax = r
            else:
                Ts = [sign * lr * d for d in d_cur]
                if max_step_norm is not None:
                    Ts = [t * (max_step_norm / torch.linalg.matrix_norm(t).clamp_min(max_step_norm)) for t in Ts]
                tmax = max(float(torch.linalg.matrix_norm(t)) for t in Ts)
            elems = _elements(Ts, action, param)
            G_new = [_as_matrix(e, action) @ g for e, g in zip(elems, G)]
            b_new = bound * step_bound(tmax) if math.isfinite(tmax) else math.nan
            reason = None
            if not math.isfinite(tmax):
                reason = "non_finite"
            elif not b_new <= max_cond:
                b_new = max(float(c) for c in conds(G_new))
                if not b_new <= max_cond:
                    reason = "ill_conditioned"
            if reason is None:
                W_new = apply(W, elems)
        if reason is None:
            s_new, L_new, d_new = evaluate(W_new, need_grad=it + 1 < steps)
            s_nf, L_nf = float(s_new), float(L_new)
            gain = sign * (s_nf - s_f)
            if not (math.isfinite(s_nf + L_nf) and math.isfinite(float(sum(w.sum() for w in W_new)))):
                reason = "non_finite"
            elif not ((abs(L_nf - L0) if loss_preserving else L_nf - L0) <= lim):
                reason = "loss"
            elif rule == "normalized" and not gain > 0:
                reason = "objective"
        if reason is None:
            W, G, bound, s_f, s_cur, L_cur = W_new, G_new, b_new, s_nf, s_new, L_new
            if d_new is not None:
                d_cur = d_new
            taken += 1
            r = min(2 * r, lr)
            continue
        rej[reason] += 1
        if rule != "normalized":
            break  # the raw rule stops at the first rejected step
        r = shrunk(r, gn, gain if reason == "objective" else 0.0, reason == "objective")
    return W, G, s_cur, L_cur, d_cur, rej, r, taken, was_capped, bound


def teleport_weights(weights: Sequence[Tensor], X: Tensor, Y: Tensor, *,
                     objective: str | Callable = "grad_norm", maximize: bool = True, loss: str = "mse",
                     steps: int = 10, lr: float | None = None, rule: str | None = None,
                     cap: float | None = None, action: str = "inverse", param: str = "I+T",
                     slope: float = DEFAULT_SLOPE, bias: bool = False, objective_kwargs: dict | None = None,
                     generator: torch.Generator | None = None, require_exact: bool = False,
                     max_step_norm: float | None = None, loss_tol: float | None = None,
                     max_cond: float = DEFAULT_MAX_COND,
                     X_pinv: Tensor | None = None) -> tuple[tuple[Tensor, ...], TeleportReport]:
    """Teleport by gradient ascent (``maximize=True``) or descent on ``objective`` over the group element.

    ``weights``: ``W_i (..., out_i, in_i[+1])``; ``X (..., d_in, b)``; ``Y (..., d_out, b)`` (or integer
    labels ``(b,)`` / ``(..., b)`` for ``loss="ce"``). ``objective``: ``"grad_norm"`` (``||grad L||^2``,
    the default), ``"sharpness"``, ``"curvature"`` or a callable ``(weights, X, Y) -> (...)``;
    ``objective_kwargs`` are passed to :func:`metatele.objectives.make_objective`.

    Step rule (docs/mathematics.md, section 5):

    * ``rule="normalized"`` (the default): ``T = +/- r dS/dT / ||dS/dT||`` (norm over all hidden layers of one
      initialisation), a trust region of radius ``r`` that starts at ``lr`` (default 0.1): a rejected step
      halves ``r``, an accepted one doubles it again up to ``lr``. A step is accepted only if it improves the
      objective (a backtracking line search), so no ``lr`` overshoots and the step does not depend on the
      objective's scale.
    * ``rule="raw"``: the papers' rule ``T = +/- lr dS/dT`` (P1 Algorithm 1; default lr 1e-3), optionally
      clipped to ``||T||_F <= max_step_norm``; a rejected step stops that initialisation. ``rule=None`` means
      ``"raw"`` when ``max_step_norm`` is given (the clipped raw rule, itself a trust region) and
      ``"normalized"`` otherwise.

    Guards, for every rule, action and dtype (a failing step is rejected and reported per reason in
    ``report.rejected``): non-finite weights, objective or group element; a composed group element of any
    hidden layer with condition number above ``max_cond``; a loss moved from the loss before the teleport
    by more than ``loss_tol`` relative (default :func:`default_loss_tol` of the weights' dtype) -- in either
    direction for a loss-preserving action (``exact``/``projection``), upwards only for the others.
    ``require_exact``: raise ``ValueError`` if the action does not keep the loss on this batch
    (batch larger than a width, see :func:`metatele.symmetry.exactness`).
    ``X_pinv``: optional cached pseudo-inverse of ``X`` (``[X; 1]`` with a bias).
    Returns ``(new_weights, report)``; the inputs are not modified.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if rule is None:
        rule = "raw" if max_step_norm is not None else "normalized"
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; allowed: {RULES}")
    if lr is None:
        lr = DEFAULT_LR[rule]
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    _check_action(action, param)
    if cap is not None and not math.isfinite(cap):
        raise ValueError(f"cap must be a finite number or None, got {cap!r}")
    if max_step_norm is not None and not (math.isfinite(max_step_norm) and max_step_norm > 0):
        raise ValueError(f"max_step_norm must be a finite number > 0 or None, got {max_step_norm!r}")
    if loss_tol is not None and not loss_tol > 0:
        raise ValueError(f"loss_tol must be > 0 (math.inf: no loss guard), got {loss_tol!r}")
    if not max_cond > 1:
        raise ValueError(f"max_cond must be > 1 (math.inf: no conditioning guard), got {max_cond!r}")
    if loss not in ("mse", "ce"):
        raise ValueError(f"unknown loss {loss!r}; allowed: 'mse', 'ce'")
    check_weights(weights, X, bias=bias)
    if len(weights) < 2:
        raise ValueError("teleport needs at least one hidden layer (two weight matrices)")
    check_teleport_data(weights, X, Y, loss)
    if X.dtype != weights[0].dtype:
        raise TypeError(f"X is {X.dtype} but the weights are {weights[0].dtype}; use one dtype")
    if X_pinv is None and action in ("inverse", "linearised"):
        ex, X_pinv = exactness(weights, X, action=action, slope=slope, bias=bias, return_pinv=True)
    else:
        ex = exactness(weights, X, action=action, slope=slope, bias=bias)
    if require_exact and not ex.loss_preserving:
        raise ValueError(f"the {action!r} action is not exact on this batch ({'; '.join(ex.detail)}); use a "
                         f"batch no larger than the widths, or require_exact=False")
    f_loss = loss_fn(loss)
    fused = objective == "grad_norm" and not objective_kwargs
    f_loss_fast = _fast_loss(loss, slope, bias)
    obj = None if fused else make_objective(objective, loss=loss, slope=slope, bias=bias, generator=generator,
                                            **(objective_kwargs or {}))
    n_lead = weights[-1].dim() - 2
    W = tuple(w.detach() for w in weights)
    lead = W[-1].shape[:-2]
    widths = [w.shape[-2] for w in W[:-1]]
    dev, dt = W[0].device, W[0].dtype
    sign = 1.0 if maximize else -1.0
    tol = default_loss_tol(dt) if loss_tol is None else float(loss_tol)
    tiny = torch.finfo(dt).tiny

    def objective_and_loss(Wc: Sequence[Tensor], create_graph: bool) -> tuple[Tensor, Tensor]:
        """``(s(Wc), L(Wc))``; for the squared gradient norm both come from one forward/backward pass."""
        if fused:
            with torch.enable_grad():
                ws, wrt = partial_inputs(Wc)
                Lc = f_loss_fast(ws, X, Y)
                grads = torch.autograd.grad(Lc.sum(), wrt, create_graph=create_graph)
            return sum(g.pow(2).sum(dim=(-2, -1)) for g in grads), Lc
        sc = obj(Wc, X, Y)
        with torch.no_grad():
            Lc = f_loss(tuple(w.detach() for w in Wc), X, Y, slope=slope, bias=bias)
        return sc, Lc

    # exact action (every pair input [h; 1] square and invertible): transform(W, I) = W, h^+ = h^{-1}, and dS/dT
    # has a closed form in the weight gradient (docs/mathematics.md, section 5), so no autograd through the action
    analytic = ex.verdict == "exact" and action in ("inverse", "linearised")
    square = ex.verdict == "exact"
    one_hidden = fused and len(W) == 2  # grad_norm of one hidden layer: closed forms, no second-order autograd

    def evaluate(Wc: Sequence[Tensor], need_grad: bool):
        """Objective and loss at ``Wc`` and, if ``need_grad``, ``dS/dT`` at ``T = 0`` for every hidden layer."""
        if one_hidden and (analytic or not need_grad):
            with torch.no_grad():
                return grad_norm_one_hidden(Wc, X, Y, loss=loss, slope=slope, bias=bias, need_grad=need_grad)
        if not need_grad:
            sc, Lc = objective_and_loss(Wc, create_graph=False)
            return sc.detach(), Lc.detach(), None
        if analytic:
            with torch.enable_grad():
                ws = tuple(w.detach().requires_grad_() for w in Wc)
                sc, Lc = objective_and_loss(ws, create_graph=True)
                GW = torch.autograd.grad(sc.sum(), ws, allow_unused=True)
            with torch.no_grad():
                GW = [torch.zeros_like(w) if gw is None else gw for gw, w in zip(GW, ws)]
                return sc.detach(), Lc.detach(), exact_action_grad(Wc, X, GW, X_pinv=X_pinv, slope=slope, bias=bias)
        with torch.enable_grad():
            Ts = [torch.zeros(*lead, k, k, dtype=dt, device=dev, requires_grad=True) for k in widths]
            gW = transform(Wc, X, _elements(Ts, action, param), action=action, slope=slope, bias=bias,
                           X_pinv=X_pinv, validate=False, square_solve=square)
            sc, Lc = objective_and_loss(gW, create_graph=True)
            dTs = torch.autograd.grad(sc.sum(), Ts, allow_unused=True)
        dTs = [torch.zeros_like(T) if d is None else d for d, T in zip(dTs, Ts)]
        return sc.detach(), Lc.detach(), dTs

    G = [torch.eye(k, dtype=dt, device=dev).expand(*lead, k, k).clone() for k in widths]
    s_cur, L_cur, d_cur = evaluate(W, need_grad=steps > 0)
    if ex.verdict != "exact" and steps > 0:
        # s_cur is the objective of transform(W, I), which for a non-exact action is a projection of W (and
        # transform(W', I) = W' for every W' = transform(W, g)); the report and the line search compare with
        # the objective and loss of the weights themselves
        s_cur, L_cur, _ = evaluate(W, need_grad=False)
    obj_before, loss_before = s_cur, L_cur

    def step_bound(t: float) -> float:
        """Upper bound on cond(g) for a step with ||T||_F <= t (>= ||T||_2): (1 + t) / (1 - t) for g = I + T,
        exp(2 t) for g = exp(T)."""
        if param == "exp" and action != "linearised":
            return math.exp(min(2 * t, 700.0))
        return (1 + t) / (1 - t) if t < 1 else math.inf

    def conds(Gs: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for Gj in Gs:
            sv = torch.linalg.svdvals(torch.nan_to_num(Gj).double())
            out.append(torch.nan_to_num(sv[..., 0] / sv[..., -1], nan=math.inf))
        return out

    def shrunk(r, gn, gain, improved_only):
        """Backtracking: after a step that passed the guards but did not improve the objective, the maximiser
        of the parabola through s(0), its slope ||dS/dT|| and s(r); after any other rejection r / 2; both
        clamped to [r / 10, r / 2]."""
        if not improved_only:
            return r * 0.5
        t_star = gn * r * r / (2 * max(gn * r - gain, tiny))
        return min(max(t_star if math.isfinite(t_star) else 0.0, r * 0.1), r * 0.5)

    if n_lead == 0:
        # one network: the bookkeeping in Python numbers (a handful of tensor ops per step instead of ~100)
        W, G, s_cur, L_cur, d_cur, rej, r, taken, was_capped, bound = _teleport_loop_one(
            W, G, s_cur, L_cur, d_cur, loss_before, steps=steps, rule=rule, lr=float(lr), sign=sign, cap=cap,
            maximize=maximize, max_step_norm=max_step_norm, max_cond=max_cond, tol=tol, tiny=tiny,
            loss_preserving=ex.loss_preserving, action=action, param=param, evaluate=evaluate,
            step_bound=step_bound, conds=conds, shrunk=shrunk,
            apply=lambda Wc, elems: transform(Wc, X, elems, action=action, slope=slope, bias=bias, X_pinv=X_pinv,
                                              validate=False, square_solve=square))
        steps_taken = torch.tensor(taken, device=dev)
        capped = torch.tensor(was_capped, device=dev)
        rejected = {k: torch.tensor(v, device=dev) for k, v in rej.items()}
        radius = torch.tensor(r, dtype=dt, device=dev)
    else:
        steps_taken = torch.zeros(lead, dtype=torch.long, device=dev)
        capped = torch.zeros(lead, dtype=torch.bool, device=dev)
        stopped = torch.zeros(lead, dtype=torch.bool, device=dev)
        rejected = {k: torch.zeros(lead, dtype=torch.long, device=dev) for k in REJECT_REASONS}
        radius = torch.full(lead, float(lr), dtype=dt, device=dev)
        lim = tol * (loss_before.abs() + tiny)
        bound = 1.0  # worst case over the initialisations and steps; singular values only once it passes max_cond
        for it in range(steps):
            if cap is not None:
                capped |= (s_cur >= cap) if maximize else (s_cur <= cap)
            active = ~capped & ~stopped
            if rule == "normalized":
                gnorm = torch.sqrt(sum(d.pow(2).sum(dim=(-2, -1)) for d in d_cur))
                active &= (gnorm > 0) | gnorm.isnan()  # stationary point: nothing to do (NaN: rejected below)
            if not bool(active.any()):
                break
            with torch.no_grad():
                if rule == "normalized":
                    scale = torch.where(active, sign * radius / gnorm.clamp_min(tiny), 0.0)
                    Ts = [d * scale.reshape(*lead, 1, 1) for d in d_cur]
                    tmax = float(lr)
                else:
                    Ts = [sign * lr * d for d in d_cur]
                    if max_step_norm is not None:
                        Ts = [t * (max_step_norm / torch.linalg.matrix_norm(t).clamp_min(max_step_norm))
                              .unsqueeze(-1).unsqueeze(-1) for t in Ts]
                    Ts = [_where(active, t, torch.zeros_like(t)) for t in Ts]
                    tmax = float(max(torch.nan_to_num(torch.linalg.matrix_norm(t), nan=math.inf).max() for t in Ts))
                elems = _elements(Ts, action, param)
                G_new = [_as_matrix(e, action) @ g for e, g in zip(elems, G)]
                bound *= step_bound(tmax)
                well = active.clone()
                if not bound <= max_cond:
                    for c in conds(G_new):
                        well &= c <= max_cond
                safe = [_where(well, e, torch.zeros_like(e) if action == "linearised" else identity_like(e))
                        for e in elems]
                W_new = transform(W, X, safe, action=action, slope=slope, bias=bias, X_pinv=X_pinv,
                                  validate=False, square_solve=square)
            s_new, L_new, d_new = evaluate(W_new, need_grad=it + 1 < steps)
            with torch.no_grad():
                # a non-finite weight reaches the loss through the forward pass (inf * 0 is NaN); the sums catch
                # the rest (a non-finite group element makes the weights non-finite)
                vals = torch.isfinite(s_new + L_new + sum(w.sum(dim=(-2, -1)) for w in W_new))
                dL = L_new - loss_before
                loss_ok = (dL.abs() if ex.loss_preserving else dL) <= lim
                # one reason per rejected step, in this order
                rejected["ill_conditioned"] += (active & ~well).long()
                rejected["non_finite"] += (well & ~vals).long()
                ok = well & vals & loss_ok
                rejected["loss"] += (well & vals & ~loss_ok).long()
                if rule == "normalized":
                    gain = sign * (s_new - s_cur)
                    obj_ok = gain > 0
                    rejected["objective"] += (ok & ~obj_ok).long()
                    good = ok & obj_ok
                    bad = active & ~good
                    curv = (gnorm * radius - gain).clamp_min(tiny)
                    t_star = torch.nan_to_num(gnorm * radius * radius / (2 * curv), nan=0.0)
                    shrink = torch.where(ok, torch.minimum(torch.maximum(t_star, radius * 0.1), radius * 0.5),
                                         radius * 0.5)
                    radius = torch.where(bad, shrink, torch.where(good, (radius * 2).clamp_max(float(lr)), radius))
                else:
                    good = ok
                    stopped |= active & ~good
                W = tuple(_where(good, a, b) for a, b in zip(W_new, W))
                G = [_where(good, a, b) for a, b in zip(G_new, G)]
                s_cur = torch.where(good, s_new, s_cur)
                L_cur = torch.where(good, L_new, L_cur)
                if d_new is not None:
                    d_cur = [_where(good, a, b) for a, b in zip(d_new, d_cur)]
                steps_taken += good.long()

    with torch.no_grad():
        # the loss of the weights themselves (evaluated at transform(W, I) = W in the loop)
        loss_after = L_cur if analytic else f_loss(W, X, Y, slope=slope, bias=bias)
        obj_after = torch.where(steps_taken > 0, s_cur, obj_before)
        cond = conds(G)
    rolled_back = sum(v for v in rejected.values()) > 0
    report = TeleportReport(loss_before, loss_after, obj_before, obj_after, steps_taken, capped, rolled_back,
                            ex, G, rejected, rule, tol, float(max_cond), cond,
                            radius if rule == "normalized" else torch.full(lead, float(lr), dtype=dt, device=dev))
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


def module_inputs(inputs: Tensor, dtype, device) -> Tensor:
    """PyTorch's ``(batch, features...)`` inputs to metatele's columns ``(features, batch)``, validated: a
    floating-point tensor with at least one sample and finite entries (errors name ``inputs``)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be (batch, features...), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating-point, got {inputs.dtype}")
    b = inputs.shape[0]
    if b == 0:
        raise ValueError(f"inputs is an empty batch (shape {tuple(inputs.shape)}): a teleport needs at least "
                         f"one sample")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs contain NaN or inf")
    return inputs.reshape(b, -1).to(dtype=dtype, device=device).T


def _module_data(inputs: Tensor, targets: Tensor, loss: str, dtype, device,
                 d_out: int | None = None) -> tuple[Tensor, Tensor]:
    """PyTorch's ``(batch, features)`` to metatele's columns ``(features, batch)``, validating both
    (:func:`module_inputs` for the inputs).

    ``d_out``: the model's output width; MSE targets must have shape ``(batch, d_out)`` (or ``(batch,)``
    when ``d_out == 1``): no silent broadcasting."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    X = module_inputs(inputs, dtype, device)
    b = X.shape[1]
    if targets.dim() == 0 or targets.shape[0] != b:
        raise ValueError(f"inputs have batch {b} but targets have "
                         f"{targets.shape[0] if targets.dim() else 'no'} rows (shape {tuple(targets.shape)})")
    if loss == "ce":
        if targets.dim() != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
            raise ValueError(f"loss='ce' needs integer class targets of shape (batch,), got "
                             f"{tuple(targets.shape)} {targets.dtype}")
        if d_out is not None and (int(targets.min()) < 0 or int(targets.max()) >= d_out):
            raise ValueError(f"targets have class labels in [{int(targets.min())}, {int(targets.max())}] but the "
                             f"model has {d_out} outputs: labels must be in [0, {d_out - 1}]")
        return X, targets.to(device)
    if loss == "mse":
        if not targets.is_floating_point():
            raise TypeError(f"targets must be floating-point for loss='mse', got {targets.dtype}")
        t = targets.reshape(b, -1)
        if d_out is not None and (t.shape[1] != d_out or (targets.dim() == 1 and d_out != 1)
                                  or targets.dim() > 2):
            raise ValueError(f"targets have shape {tuple(targets.shape)} but the model's outputs have shape "
                             f"({b}, {d_out}); for loss='mse' they must match")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("targets contain NaN or inf")
        return X, t.to(dtype=dtype, device=device).T
    raise ValueError(f"unknown loss {loss!r}; allowed: 'mse', 'ce'")


def model_weights(model: nn.Module) -> tuple[tuple[Tensor, ...], float, bool]:
    """``from_sequential`` plus the checks a teleport needs: float32/float64 and finite parameters."""
    W, slope, bias = from_sequential(model)
    if W[0].dtype in _HALF or not W[0].is_floating_point():
        raise TypeError(f"model parameters are {W[0].dtype}: teleport needs float32 or float64 (in half precision "
                        f"the group action and the loss guard cannot resolve the loss); call model.float() first")
    for i, w in enumerate(W):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"model parameters contain NaN or inf (linear layer {i}): there is no level set "
                             f"to move along")
    return W, slope, bias


def teleport(model: nn.Module, inputs: Tensor, targets: Tensor, *, objective: str | Callable = "grad_norm",
             loss: str = "mse", steps: int = 10, lr: float | None = None, rule: str | None = None,
             maximize: bool = True, cap: float | None = None, action: str = "inverse", param: str = "I+T",
             objective_kwargs: dict | None = None, generator: torch.Generator | None = None,
             require_exact: bool = False, max_step_norm: float | None = None, loss_tol: float | None = None,
             max_cond: float = DEFAULT_MAX_COND) -> TeleportReport:
    """Teleport an ``nn.Sequential`` of ``nn.Linear`` and ``nn.LeakyReLU`` layers in place.

    ``inputs``: ``(batch, features)``; ``targets``: ``(batch, d_out)`` floats for ``loss="mse"``
    (``1/2`` the squared error summed over the batch; ``(batch,)`` only for one output) or ``(batch,)``
    integer classes in ``[0, d_out)`` for ``loss="ce"`` (cross-entropy, mean over the batch). Biases are
    handled as an extra input column of ones. ``objective``: ``"grad_norm"``, ``"sharpness"`` or
    ``"curvature"`` (``maximize`` picks the direction). ``rule``, ``lr``, ``max_step_norm``, ``loss_tol``,
    ``max_cond``: see :func:`teleport_weights` (default: normalised steps of length 0.1 with backtracking,
    every step guarded; ``rule="raw"`` for the papers' rule). Rejected steps are not applied, and the
    report says which and why. Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument.
    """
    W, slope, bias = model_weights(model)
    X, Y = _module_data(inputs, targets, loss, W[0].dtype, W[0].device, d_out=W[-1].shape[-2])
    new, report = teleport_weights(W, X, Y, objective=objective, maximize=maximize, loss=loss, steps=steps,
                                   lr=lr, rule=rule, cap=cap, action=action, param=param, slope=slope, bias=bias,
                                   objective_kwargs=objective_kwargs, generator=generator,
                                   require_exact=require_exact, max_step_norm=max_step_norm, loss_tol=loss_tol,
                                   max_cond=max_cond)
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
        X, Y = _module_data(inputs, targets, loss, W[0].dtype, W[0].device, d_out=W[-1].shape[-2])
    new, report = random_teleport(W, X, Y, magnitude=magnitude, loss=loss, action=action, param=param,
                                  directions=directions, slope=slope, bias=bias, generator=generator)
    to_sequential(new, model)
    return report
