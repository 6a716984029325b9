"""Baselines of the meta-learning comparison: plain GD and GD with hand-designed teleport on a schedule
(docs/meta_learning.md, section 6), for many initialisations at once (one batched computation, no loop over them).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .nets import DEFAULT_SLOPE, augment, loss_fn
from .teleport import TeleportReport, teleport_weights

__all__ = ["GDResult", "gd_step", "run_gd"]


@dataclass
class GDResult:
    """Per-step records of a GD run over ``B`` initialisations.

    ``loss (B, steps)``: loss at ``w_t`` (before the update of step ``t``, after any teleport at ``t``);
    ``grad_norm_sq (B, steps)``: ``||grad L(w_t)||^2``; ``time (steps,)``: wall-clock seconds since the start,
    after step ``t``; ``teleports``: ``(step, report)`` pairs; ``weights``: the final weights.
    """

    loss: Tensor
    grad_norm_sq: Tensor
    time: Tensor
    weights: tuple[Tensor, ...]
    teleports: list[tuple[int, TeleportReport]] = field(default_factory=list)


def gd_step(weights: Sequence[Tensor], X: Tensor, Y: Tensor, lr: float | Tensor, *, loss: str = "mse",
            slope: float = DEFAULT_SLOPE, bias: bool = False) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """One step ``w <- w - lr grad L(w)``; returns ``(new_weights, L(w) (...), ||grad L(w)||^2 (...))``.

    ``lr`` may be a tensor broadcasting against the leading dimensions (one step size per initialisation).
    """
    with torch.enable_grad():
        ws = tuple(w.detach().requires_grad_() for w in weights)
        L = loss_fn(loss)(ws, X, Y, slope=slope, bias=bias)
        grads = torch.autograd.grad(L.sum(), ws)
    lr_t = lr.reshape(*lr.shape, 1, 1) if isinstance(lr, Tensor) else lr
    new = tuple(w.detach() - lr_t * g for w, g in zip(weights, grads))
    return new, L.detach(), sum(g.pow(2).sum(dim=(-2, -1)) for g in grads)


def run_gd(weights: Sequence[Tensor], X: Tensor, Y: Tensor, *, steps: int, lr: float, loss: str = "mse",
           teleport_at: Sequence[int] = (), teleport_kwargs: dict | None = None,
           slope: float = DEFAULT_SLOPE, bias: bool = False) -> GDResult:
    """Gradient descent for ``steps`` steps on every initialisation of the batch at once.

    ``weights``: ``W_i (B, out_i, in_i)`` (or unbatched); ``X (B, d_in, b)``; ``Y (B, d_out, b)``.
    ``teleport_at``: steps before which :func:`metatele.teleport.teleport_weights` is applied with
    ``teleport_kwargs`` (objective, lr, steps, cap, ...).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    bad = [t for t in teleport_at if not 0 <= t < steps]
    if bad:
        raise ValueError(f"teleport steps {bad} are outside [0, {steps})")
    at = set(int(t) for t in teleport_at)
    tk = dict(teleport_kwargs or {})
    W = tuple(w.detach() for w in weights)
    X_pinv = torch.linalg.pinv(augment(X) if bias else X) if at else None
    losses, gnorms, times, reports = [], [], [], []
    t0 = time.perf_counter()
    for t in range(steps):
        if t in at:
            W, rep = teleport_weights(W, X, Y, loss=loss, slope=slope, bias=bias, X_pinv=X_pinv, **tk)
            reports.append((t, rep))
        W, L, g2 = gd_step(W, X, Y, lr, loss=loss, slope=slope, bias=bias)
        losses.append(L)
        gnorms.append(g2)
        if L.is_cuda:  # the clock must wait for the GPU's queued work
            torch.cuda.synchronize(L.device)
        times.append(time.perf_counter() - t0)
    return GDResult(torch.stack(losses, -1), torch.stack(gnorms, -1), torch.tensor(times), W, reports)
