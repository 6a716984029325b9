"""Group elements of GL_k: parametrisations ``g = I + T`` and ``g = exp(T)`` (docs/mathematics.md, section 2).

``T`` has shape ``(..., k, k)``; every function broadcasts over the leading dimensions.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PARAMETRISATIONS", "normalise", "group_element", "check_group_element", "identity_like"]

PARAMETRISATIONS = ("I+T", "exp")


def identity_like(T: Tensor) -> Tensor:
    """Identity matrices with the shape, dtype and device of ``T`` ``(..., k, k)``."""
    k = T.shape[-1]
    return torch.eye(k, dtype=T.dtype, device=T.device).expand(T.shape)


def normalise(T: Tensor, magnitude: float, eps: float = 1e-30) -> Tensor:
    """Rescale every ``T`` to Frobenius norm ``magnitude`` (P2 eq. for the learned teleport, 0.01).

    A zero ``T`` stays zero (no division by zero).
    """
    if magnitude < 0:
        raise ValueError(f"magnitude must be >= 0, got {magnitude}")
    norm = torch.linalg.matrix_norm(T).unsqueeze(-1).unsqueeze(-1)
    return T * (magnitude / norm.clamp_min(eps))


def group_element(T: Tensor, param: str = "I+T", magnitude: float | None = None) -> Tensor:
    """The group element ``g`` built from a Lie-algebra-like ``T`` ``(..., k, k)``.

    * ``"I+T"``: ``g = I + T``; its inverse is taken exactly by the actions (``solve``), not ``I - T``.
    * ``"exp"``: ``g = exp(T)`` (matrix exponential), always invertible.

    ``magnitude``: if given, ``T`` is first normalised to that Frobenius norm.
    """
    if T.shape[-1] != T.shape[-2]:
        raise ValueError(f"T must be square (..., k, k), got shape {tuple(T.shape)}")
    if magnitude is not None:
        T = normalise(T, magnitude)
    if param == "I+T":
        return identity_like(T) + T
    if param == "exp":
        return torch.linalg.matrix_exp(T)
    raise ValueError(f"unknown group parametrisation {param!r}; allowed: {PARAMETRISATIONS}")


def check_group_element(g: Tensor, max_cond: float = 1e10) -> None:
    """Raise ``ValueError`` if ``g`` is not square, not finite, or (numerically) singular."""
    if g.shape[-1] != g.shape[-2]:
        raise ValueError(f"group element must be square (..., k, k), got shape {tuple(g.shape)}")
    if not torch.isfinite(g).all():
        raise ValueError("group element has non-finite entries (nan or inf)")
    with torch.no_grad():
        cond = torch.linalg.cond(g.detach().double())
    worst = float(cond.max()) if cond.numel() else 0.0
    if not worst < max_cond:
        raise ValueError(f"group element is singular or ill-conditioned: condition number {worst:.3g} "
                         f"(allowed < {max_cond:.0e})")
