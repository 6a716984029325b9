"""The unroller: inner optimisation steps of a :class:`~metatele.learned.LearnedMethod` on a batch of
trajectories, window by window (P2 section 6, truncated BPTT).

One inner step ``t`` on weights ``w_t`` (``W_i (B, out, in)``, ``B`` trajectories at once):

* ``teleport.order = "update_then_teleport"`` (P2): ``g_t = dL/dw (w_t)``;
  ``w' = update(w_t, g_t)``; if ``t % every == 0`` (and ``t < until`` where ``teleport.until > 0``): ``T = TeleportLSTM(g_t)``, ``w_{t+1} = g(T) . w'``.
* ``teleport.order = "teleport_then_update"``: ``g_t = dL/dw (w_t)``; ``T = TeleportLSTM(g_t)``,
  ``w' = g(T) . w_t``; ``g' = dL/dw (w')``; ``w_{t+1} = update(w', g')`` (one extra gradient).

``update`` is ``w - UpdateLSTM(g)`` or ``w - lr_t g`` (LSTM(lr,tele), ``lr_t`` proposed at step t-1,
``lstm.lr_init`` at step 0). The recorded loss of step ``t`` is ``L(w_t)``, before the step.

``through_teleport`` (``meta.through_teleport``, with first-order meta-gradients): the gradient taken at a
teleported point ``g(T) . w'`` keeps its dependence on that ``T``. It is evaluated at
``g(T) . stop_grad(w')`` (same value), with ``create_graph``, so the meta-gradient sees how the teleport
changed the gradient the next update reads (the mechanism the papers teleport for), while the update
LSTM's own path stays first-order (full second order, ``meta.first_order = false``, is unstable there).

Meta-loss of the window of steps ``t0 .. t0+K-1`` (``w_{t0}`` is a detached leaf): the weighted sum
``sum_{j=1..K} decay^(K-j) f(L(w_{t0+j}))`` averaged over trajectories, i.e. the losses *after* each
update of the window (every term depends on the LSTMs), with ``f`` the identity (P2's sum), ``log`` or
``L / L(w_{t0})`` (``meta.meta_loss``). The graph is cut after the window (:meth:`Unroller.cut`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..config import META_LOSSES
from ..learned.methods import LearnedMethod
from ..learned.teleport import action_dtype
from ..nets import mse_loss
from .higher_adapter import AutogradStepper, HigherStepper, NoGradStepper, independent

__all__ = ["InnerState", "start", "inner_step", "window_meta_loss", "run_window", "rollout", "STEPPERS"]

STEPPERS = {"higher": HigherStepper, "autograd": AutogradStepper, "nograd": NoGradStepper}


@dataclass
class InnerState:
    """Everything one batch of trajectories carries between inner steps.

    weights: ``W_i (B, out, in)``; X ``(B, d_in, b)``; Y ``(B, d_out, b)``; X_pinv ``(B, b, d_in)`` in the
    teleport's compute dtype; lstm: the method's recurrent state; t: index of the next inner step;
    tele_view: the same weights as ``g(T) . stop_grad(w')`` when the last step teleported under
    ``through_teleport`` (their graph reaches only ``T``), else None.
    phase: ``(B,)`` long, each trajectory's own inner step when they are not in step (staggered
    meta-training, ``train.stagger``; the teleport schedule is then per trajectory), else None (every
    trajectory is at step ``t``).
    view_rows: when only some trajectories teleported at the last step (staggered), their indices ``(m,)``;
    ``tele_view`` then holds those ``m`` rows only (the others' gradient is a constant). None: all rows.
    """

    weights: tuple[Tensor, ...]
    X: Tensor
    Y: Tensor
    X_pinv: Tensor | None
    lstm: dict[str, Any]
    t: int = 0
    tele_view: tuple[Tensor, ...] | None = None
    phase: Tensor | None = None
    view_rows: Tensor | None = None

    def cut(self, requires_grad: bool = True) -> "InnerState":
        """Truncation boundary: detach weights and recurrent state (no graph crosses it)."""
        w = tuple(x.detach().requires_grad_(requires_grad) for x in self.weights)
        return InnerState(w, self.X, self.Y, self.X_pinv, LearnedMethod.detach_state(self.lstm), self.t,
                          phase=self.phase)

    def select(self, keep: Tensor) -> "InnerState":
        """The trajectories ``keep`` (indices into the batch) alone, e.g. to go on without diverged ones."""
        pick = lambda x: None if x is None else x.index_select(0, keep)  # noqa: E731
        view = self.tele_view
        if view is not None and self.view_rows is not None:  # one view row per trajectory again
            view = tuple(w.detach().index_copy(0, self.view_rows, v) for w, v in zip(self.weights, view))
        view = None if view is None else tuple(pick(w) for w in view)
        return InnerState(tuple(pick(w) for w in self.weights), pick(self.X), pick(self.Y), pick(self.X_pinv),
                          LearnedMethod.select_state(self.lstm, keep), self.t, view, pick(self.phase))

    def phases(self) -> Tensor:
        """Each trajectory's inner step ``(B,)``: ``phase``, or ``t`` for all when they are in step."""
        if self.phase is not None:
            return self.phase
        return torch.full((self.X.shape[0],), self.t, dtype=torch.long, device=self.X.device)

    def diverged_rows(self) -> Tensor:
        """``(B,)`` bool: the trajectories whose weights are no longer finite."""
        return torch.stack([~torch.isfinite(w).flatten(1).all(1) for w in self.weights]).any(0)

    def replace(self, rows: Tensor, fresh: "InnerState") -> "InnerState":
        """The trajectories ``rows`` (indices into the batch) replaced by those of ``fresh`` (a :func:`start`
        of ``len(rows)`` new problems, at their own step, 0 by default), the others kept: a staggered
        population's finished trajectories make way for new ones. Call it at a truncation boundary
        (after :meth:`cut`: no graph, no teleport view)."""
        if self.tele_view is not None:
            raise ValueError("replace trajectories at a truncation boundary (after cut()), not mid-window")
        put = lambda x, y: None if x is None else x.index_copy(0, rows, y.to(x.dtype))  # noqa: E731
        w = tuple(put(x.detach(), y.detach()).requires_grad_(x.requires_grad) for x, y in zip(self.weights, fresh.weights))
        return InnerState(w, put(self.X, fresh.X), put(self.Y, fresh.Y), put(self.X_pinv, fresh.X_pinv),
                          LearnedMethod.replace_state(self.lstm, rows, fresh.lstm), self.t,
                          phase=put(self.phases(), fresh.phases()))


def start(method: LearnedMethod, weights: Sequence[Tensor], X: Tensor, Y: Tensor, *,
          requires_grad: bool = True) -> InnerState:
    """Initial inner state of ``B = X.shape[0]`` trajectories (zero LSTM state, cached ``X^+``)."""
    B = X.shape[0]
    dt = weights[0].dtype
    X_pinv = None
    if method.learn_tele:
        X_pinv = torch.linalg.pinv(X.to(action_dtype(dt, method.tele_cfg.compute_dtype)))
    p = next(method.parameters())
    st = method.init_state(B, dtype=p.dtype, device=X.device)
    st["lr"] = st["lr"].to(dt)
    w = tuple(x.detach().clone().requires_grad_(requires_grad) for x in weights)
    return InnerState(w, X, Y, X_pinv, st, 0)


def _grad_at_view(view: Sequence[Tensor], lf) -> tuple[Tensor, ...]:
    """The gradient of the loss at ``view`` (``g(T) . stop_grad(w')``), kept differentiable in ``T``."""
    v = independent(view)
    return tuple(torch.autograd.grad(lf(v).sum(), list(v), create_graph=True))


def inner_step(method: LearnedMethod, s: InnerState, stepper, *, through_teleport: bool = False
               ) -> tuple[InnerState, Tensor, Tensor]:
    """One inner step (see the module docstring).

    Returns ``(new state, L(w_t) (B,) with its graph, ||g_t||^2 (B,) detached)``.
    """
    c = method.tele_cfg
    X, Y = s.X, s.Y
    through = through_teleport and stepper.first_order and torch.is_grad_enabled()

    def lf(w):
        return mse_loss(w, X, Y)

    holder = {"lstm": s.lstm}

    def rule(w, g, grad_rows=None):
        new, holder["lstm"] = method.propose_update(w, g, holder["lstm"], grad_rows)
        return new

    # 0: no teleport at this step; a (B,) tensor when the trajectories are at different steps (staggered)
    scale = method.teleport_scale(s.t) if s.phase is None else method.teleport_scales(s.phase)
    moving = None  # staggered, when only some trajectories teleport at this step: their indices
    if isinstance(scale, Tensor) and not bool((scale != 0).all()):
        moving = (scale != 0).nonzero().squeeze(1)
        scale = scale.index_select(0, moving)

    def pick(x):
        """The ``moving`` trajectories' rows of ``x`` (all of it when every trajectory teleports)."""
        return x if moving is None or x is None else x.index_select(0, moving)

    def proposed(g, state):
        """The teleport LSTMs' ``T`` (of the ``moving`` trajectories only; the others keep their teleport
        state and step size, as they would in a batch of their own)."""
        if moving is None:
            return method.propose_teleport(g, state)
        Ts, sub = method.propose_teleport(tuple(pick(x) for x in g), LearnedMethod.select_state(state, moving))
        return Ts, LearnedMethod.replace_state(state, moving, sub)

    def teleported(w, Ts):
        """``g(T) . w`` and, under ``through``, the view ``g(T) . stop_grad(w)`` of the ``moving`` trajectories
        (two plain calls: batching them into one measured no faster at paper size). Trajectories not ``moving``
        keep ``w`` exactly. The view has the rows ``moving`` only."""
        if isinstance(scale, Tensor):
            Ts = [None if T is None else T * scale.to(T).reshape((-1,) + (1,) * (T.dim() - 1)) for T in Ts]
        elif scale != 1.0:
            Ts = [None if T is None else T * scale for T in Ts]
        ws, Xs, Ps = tuple(pick(x) for x in w), pick(X), pick(s.X_pinv)
        view = method.teleport(tuple(x.detach() for x in ws), Xs, Ts, Ps) if through else None
        out = method.teleport(ws, Xs, Ts, Ps)
        if moving is not None:
            out = tuple(x.index_copy(0, moving, y) for x, y in zip(w, out))
        return out, view

    def loss_grad(w, view, rows):
        """``L(w)`` with its graph and the gradient the LSTMs read: taken at ``view`` when there is one, for
        the trajectories ``rows`` that it covers (None: all); the others' gradient is a constant, so the
        second-order work is done on the teleported rows only."""
        if view is None:
            return stepper.grad(w, lf)
        if rows is None:
            return lf(independent(w)), _grad_at_view(view, lf)
        loss, g = stepper.grad(w, lf)  # first order: constants
        Xr, Yr = X.index_select(0, rows), Y.index_select(0, rows)
        g_view = _grad_at_view(view, lambda v: mse_loss(v, Xr, Yr))
        return loss, tuple(x.index_copy(0, rows, y) for x, y in zip(g, g_view))

    def loss_grad_step(w, view, rows):
        if view is None:
            return stepper.step(w, lf, rule)
        loss, g = loss_grad(w, view, rows)
        return loss, tuple(rule(tuple(w), g, rows)), g

    view = None
    teleports = isinstance(scale, Tensor) or scale != 0
    if teleports and c.order == "teleport_then_update":
        loss, g = loss_grad(s.weights, s.tele_view, s.view_rows)
        Ts, holder["lstm"] = proposed(g, holder["lstm"])
        w, w_view = teleported(s.weights, Ts)
        _, new, _ = loss_grad_step(w, w_view, moving)
    else:
        loss, new, g = loss_grad_step(s.weights, s.tele_view, s.view_rows)
        if teleports:
            Ts, holder["lstm"] = proposed(g, holder["lstm"])
            new, view = teleported(new, Ts)
    gn = sum(x.detach().pow(2).flatten(1).sum(1) for x in g)
    phase = None if s.phase is None else s.phase + 1
    view_rows = moving if view is not None else None
    return (InnerState(tuple(new), X, Y, s.X_pinv, holder["lstm"], s.t + 1, view, phase, view_rows),
            loss, gn)


def window_meta_loss(losses: Sequence[Tensor], start_loss: Tensor, kind: str = "sum",
                     decay: float = 1.0) -> Tensor:
    """Meta-loss of one window from the post-update losses ``losses[j] = L(w_{t0+j+1}) (B,)``.

    ``sum_j decay^(K-1-j) f(losses[j])``, mean over the ``B`` trajectories; ``f`` by ``kind``:
    ``"sum"`` identity (P2), ``"log"`` natural log, ``"mean_ratio"`` ``L / start_loss`` (detached).
    """
    K = len(losses)
    terms = []
    for j, L in enumerate(losses):
        if kind == "sum":
            f = L
        elif kind == "log":
            f = torch.log(L)
        elif kind == "mean_ratio":
            f = L / start_loss.detach()
        else:
            raise ValueError(f"meta_loss kind {kind!r}; allowed: {list(META_LOSSES)}")
        terms.append(decay ** (K - 1 - j) * f)
    return torch.stack(terms).sum(0).mean()


def _all_finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def run_window(method: LearnedMethod, s: InnerState, K: int, stepper, *, kind: str = "sum",
               decay: float = 1.0, stop_sync: Callable[[int], int] | None = None,
               through_teleport: bool = False) -> tuple[InnerState, Tensor, Tensor]:
    """Unroll ``K`` inner steps from ``s`` (whose weights should be detached leaves, see ``cut``).

    Returns ``(state after the window (graph attached), meta-loss (scalar, graph attached),
    recorded losses L(w_t) (K, B) detached)``. The meta-loss terms are ``L(w_{t0+1}), ..., L(w_{t0+K})``:
    the first ``K - 1`` are the losses the inner steps computed anyway, the last one is one extra
    forward of the network at the window's end. If a trajectory's loss becomes non-finite (the inner
    optimisation diverged) the window stops there and the meta-loss keeps the finite terms before it, so
    the meta-update still learns from the rising losses instead of being skipped; the returned state then
    has non-finite weights and the trainer abandons the meta-batch.

    stop_sync: data-parallel runs (:mod:`metatele.meta.distributed`) pass ``stop_sync(local) -> minimum
    over the processes`` of the stop index (``j`` for a non-finite ``L(w_{t0+j})``, ``K`` for a non-finite
    end loss, ``K + 1`` for none). Every process unrolls until its own stop, then, after that one
    collective, rewinds to the step where one process with every trajectory would have stopped (same
    state, records and meta-loss terms): one collective per window instead of one per step.

    through_teleport: see the module docstring (first-order steppers only; ignored otherwise).
    """
    if K < 1:
        raise ValueError(f"window length K = {K} must be >= 1")
    recorded, post, states = [], [], []
    start_loss = None
    stop = K + 1
    for j in range(K):
        s, loss_t, _ = inner_step(method, s, stepper, through_teleport=through_teleport)
        recorded.append(loss_t.detach())
        states.append(s)
        if j == 0:
            start_loss = loss_t.detach()
        elif not _all_finite(loss_t):
            stop = j
            break  # diverged: keep the finite terms before it (their gradients push back), stop here
        else:
            post.append(loss_t)
    else:
        end = mse_loss(s.weights, s.X, s.Y)
        if _all_finite(end):
            post.append(end)
        else:
            stop = K
    if stop_sync is not None:
        first = int(stop_sync(stop))
        if first < stop:  # another process stopped earlier: rewind to where one process would be
            if first < K:
                s, recorded, post = states[first], recorded[:first + 1], post[:first - 1]
            else:  # only the end loss was non-finite elsewhere
                post = post[:K - 1]
    if not post:  # diverged at the first update: nothing finite to learn from (the trainer skips it)
        return s, torch.full((), float("nan"), dtype=start_loss.dtype, device=start_loss.device), \
            torch.stack(recorded)
    meta = window_meta_loss(post, start_loss, kind, decay)
    return s, meta, torch.stack(recorded)


def rollout(method: LearnedMethod, weights: Sequence[Tensor], X: Tensor, Y: Tensor, steps: int
            ) -> dict[str, Tensor]:
    """Evaluate ``method`` for ``steps`` inner steps under ``torch.no_grad`` (whole horizon, no graph).

    Returns ``loss (B, steps)`` (``L(w_t)`` before step t), ``grad_norm_sq (B, steps)``, ``time (steps,)``
    (cumulative seconds after each step) and ``lr (B, steps)`` (step size used, LSTM(lr,tele) only).
    """
    if steps < 1:
        raise ValueError(f"steps = {steps} must be >= 1")
    stepper = NoGradStepper()
    with torch.no_grad():
        s = start(method, weights, X, Y, requires_grad=False)
        losses, gns, times, lrs = [], [], [], []
        t0 = time.perf_counter()
        for _ in range(steps):
            lrs.append(s.lstm["lr"].detach().clone())
            s, loss, gn = inner_step(method, s, stepper)
            losses.append(loss)
            gns.append(gn)
            if X.is_cuda:  # kernels run asynchronously: wait for them, or the clock measures launches
                torch.cuda.synchronize(X.device)
            times.append(time.perf_counter() - t0)
    return {"loss": torch.stack(losses, 1), "grad_norm_sq": torch.stack(gns, 1),
            "time": torch.tensor(times, dtype=torch.float64), "lr": torch.stack(lrs, 1)}
