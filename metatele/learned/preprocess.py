"""Gradient preprocessing for the LSTM inputs (pure functions).

Regression losses of the paper problem start near 5e5 and gradient entries near 5e3, then shrink by
orders of magnitude, so raw gradients (P2) saturate the LSTM gates. Options:

* ``"none"``: ``x = g`` (P2).
* ``"scale"``: ``x = g / s``.
* ``"log_sign"`` (Andrychowicz et al. 2016, appendix A): per coordinate
  ``(log|g| / p, sign g)`` if ``|g| >= exp(-p)``, else ``(-1, exp(p) g)``; the two channels are
  concatenated along the last dimension, so the width doubles.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import PREPROCESS

__all__ = ["PREPROCESS", "preprocess", "preprocessed_width"]


def log_sign(g: Tensor, p: float = 10.0) -> tuple[Tensor, Tensor]:
    """Andrychowicz et al.'s two channels, each shaped like ``g``."""
    a = g.abs()
    big = a >= math.exp(-p)
    c1 = torch.where(big, torch.log(a.clamp_min(math.exp(-p))) / p, torch.full_like(g, -1.0))
    c2 = torch.where(big, torch.sign(g), g * math.exp(p))
    return c1, c2


def preprocess(g: Tensor, kind: str = "none", *, p: float = 10.0, scale: float = 1.0) -> Tensor:
    """Preprocess gradients ``g (..., n)`` to ``(..., n)`` (``none``, ``scale``) or ``(..., 2n)`` (``log_sign``)."""
    if kind == "none":
        return g
    if kind == "scale":
        return g / scale
    if kind == "log_sign":
        c1, c2 = log_sign(g, p)
        return torch.cat([c1, c2], dim=-1)
    raise ValueError(f"unknown preprocessing {kind!r}; allowed: {PREPROCESS}")


def preprocessed_width(n: int, kind: str) -> int:
    """Width of :func:`preprocess`'s output for ``n`` inputs."""
    if kind not in PREPROCESS:
        raise ValueError(f"unknown preprocessing {kind!r}; allowed: {PREPROCESS}")
    return 2 * n if kind == "log_sign" else n
