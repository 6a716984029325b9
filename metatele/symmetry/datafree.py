"""Data-free symmetries of ReLU / LeakyReLU layers: positive rescaling and permutation (docs/mathematics.md, section 3.6).

Both keep the network function exactly for any batch: ``sigma(D z) = D sigma(z)`` for a positive diagonal
``D`` and ``sigma(P z) = P sigma(z)`` for a permutation ``P``.
Shapes: ``U (..., m, k[+1])``, ``V (..., k, n[+1])``; the bias column of ``V`` moves with its row, the
bias column of ``U`` is unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .actions import _join_u, _split_u

__all__ = ["rescale", "permute"]


def rescale(U: Tensor, V: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """``U -> U D^{-1}``, ``V -> D V`` with ``D = diag(d)``, ``d (..., k)`` strictly positive."""
    if d.shape[-1] != V.shape[-2]:
        raise ValueError(f"scale vector has {d.shape[-1]} entries; the hidden layer has width {V.shape[-2]}")
    if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
        raise ValueError("rescaling factors must be finite and strictly positive "
                         f"(got min {float(d.min()):.3g})")
    Uw, Ub = _split_u(U, d.shape[-1])
    return _join_u(Uw / d.unsqueeze(-2), Ub), V * d.unsqueeze(-1)


def permute(U: Tensor, V: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """``V -> P V`` (row ``i`` becomes row ``perm[i]``) and ``U -> U P^T``; ``perm`` is a permutation of ``range(k)``."""
    k = V.shape[-2]
    perm = torch.as_tensor(perm, device=V.device)
    if perm.shape != (k,) or not torch.equal(torch.sort(perm).values, torch.arange(k, device=V.device)):
        raise ValueError(f"perm must be a permutation of range({k}), got {perm.tolist()}")
    Uw, Ub = _split_u(U, k)
    return _join_u(Uw[..., :, perm], Ub), V[..., perm, :]
