"""Applying a learned ``T`` to a network (pure functions; docs/mathematics.md, section 3, and P2 section 6).

``action = "inverse"``: the exact inverse-form action with ``g = I + T`` (true inverse by ``solve``) or
``g = exp(T)``; it keeps the loss whenever ``X`` has full column rank (paper problem: X is 20 x 20).
``action = "linearised"``: P2's ``U (I - T)``, ``V -> sigma^{-1}((I+T) sigma(VX)) X^+`` (first order).
With ``compute_dtype = "float64"`` the action runs in float64 and the result is cast back, which keeps
the loss of a float32 network to ~1e-8 relative (in float32 the pseudo-inverse of an X with condition
number ~1e4 alone changes the loss by up to ~3e-5 relative).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..config import COMPUTE_DTYPES, LEARNED_ACTIONS
from ..nets import DEFAULT_SLOPE
from ..symmetry import group_element, transform

__all__ = ["LEARNED_ACTIONS", "apply_learned_teleport", "action_dtype"]


def action_dtype(dtype: torch.dtype, compute_dtype: str) -> torch.dtype:
    """The dtype the group action runs in (``"float64"`` or ``"same"`` as ``dtype``)."""
    if compute_dtype == "float64":
        return torch.float64
    if compute_dtype == "same":
        return dtype
    raise ValueError(f"compute_dtype = {compute_dtype!r}; allowed: {list(COMPUTE_DTYPES)}")


def _non_finite(weights: Sequence[Tensor], Ts: Sequence[Tensor | None]) -> Tensor | None:
    """Mask ``(...)`` of the networks (leading dimensions) with a non-finite weight or ``T``, or None when
    every entry is finite (the common case: one reduction, no mask)."""
    parts = [w for w in weights] + [T for T in Ts if T is not None]
    if all(bool(torch.isfinite(x).all()) for x in parts):
        return None
    lead = weights[0].shape[:-2]
    bad = torch.zeros(lead, dtype=torch.bool, device=weights[0].device)
    for x in parts:
        bad = bad | ~torch.isfinite(x).flatten(len(lead)).all(-1)
    return bad


def apply_learned_teleport(weights: Sequence[Tensor], X: Tensor, Ts: Sequence[Tensor | None], *,
                           action: str = "inverse", param: str = "I+T", compute_dtype: str = "float64",
                           X_pinv: Tensor | None = None, slope: float = DEFAULT_SLOPE,
                           bias: bool = False) -> tuple[Tensor, ...]:
    """Teleport ``weights`` (``W_i (..., out, in)``) on the batch ``X (..., d_in, b)`` with one
    ``T_i (..., k_i, k_i)`` per hidden layer (``None``: leave that layer alone).

    ``X_pinv``: cached pseudo-inverse of ``X`` (of ``[X; 1]`` with a bias) in the compute dtype.
    Differentiable in ``weights`` and ``Ts``. Returns weights in their original dtype.
    No validation of the group elements (``transform(validate=False)``): in this hot loop ``g = I + T`` with
    ``||T||_F`` = magnitude << 1 is invertible by construction, and a non-finite ``T`` (a diverged
    trajectory) must propagate to the trainer, which skips that meta-update, rather than raise: a network
    (leading index) with a non-finite weight or ``T`` gets NaN weights, the others are teleported as usual
    (with several hidden layers the action takes pseudo-inverses of hidden activations, and an SVD of
    NaNs would raise).
    """
    if action not in LEARNED_ACTIONS:
        raise ValueError(f"teleport action {action!r}; allowed: {LEARNED_ACTIONS}")
    bad = _non_finite(weights, Ts)
    if bad is not None:  # a diverged trajectory: run the others, give it NaN weights (no SVD of NaNs)
        safe = [torch.where(bad.reshape(bad.shape + (1, 1)), torch.zeros_like(w), w) for w in weights]
        safe_T = [None if T is None else torch.where(bad.reshape(bad.shape + (1, 1)), torch.zeros_like(T), T)
                  for T in Ts]
        out = apply_learned_teleport(safe, X, safe_T, action=action, param=param, compute_dtype=compute_dtype,
                                     X_pinv=X_pinv, slope=slope, bias=bias)
        return tuple(torch.where(bad.reshape(bad.shape + (1, 1)), torch.full_like(w, float("nan")), w)
                     for w in out)
    dt = weights[0].dtype
    cdt = action_dtype(dt, compute_dtype)
    W = tuple(w.to(cdt) for w in weights)
    Xc = X.to(cdt)
    Xp = None if X_pinv is None else X_pinv.to(cdt)
    if action == "inverse":
        elems = [None if T is None else group_element(T.to(cdt), param) for T in Ts]
        out = transform(W, Xc, elems, action="inverse", slope=slope, bias=bias, X_pinv=Xp, validate=False)
    else:
        elems = [None if T is None else T.to(cdt) for T in Ts]
        out = transform(W, Xc, elems, action="linearised", slope=slope, bias=bias, X_pinv=Xp,
                        validate=False)
    return tuple(w.to(dt) for w in out)
