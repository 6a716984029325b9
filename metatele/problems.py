"""Seeded problem families.

Regression family of the meta-learning experiments (docs/meta_learning.md, section 1): two-layer (or deeper) LeakyReLU
networks ``dims = [b, d_in, h_1, ..., d_out]`` with ``W_i``, ``X`` and ``Y`` uniform in [0, 1), each
trajectory drawn from its own seed. Meta-training and evaluation seeds come from disjoint streams:
train seeds are even (``2 i``), evaluation seeds are odd (``2 i + 1``), so no evaluation trajectory can ever
have been seen in training, whatever the counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .nets import init_uniform, regression_data

__all__ = ["RegressionBatch", "train_seeds", "eval_seeds", "regression_problem", "regression_batch",
           "is_train_seed", "is_eval_seed"]


def train_seeds(n: int, start: int = 0, base: int = 0) -> list[int]:
    """Seeds of meta-training trajectories ``start, ..., start + n - 1`` (even numbers, offset by ``base``)."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    return [2 * (base + start + i) for i in range(n)]


def eval_seeds(n: int, start: int = 0, base: int = 0) -> list[int]:
    """Seeds of evaluation trajectories (odd numbers): disjoint from :func:`train_seeds` for any arguments."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    return [2 * (base + start + i) + 1 for i in range(n)]


def is_train_seed(seed: int) -> bool:
    return seed % 2 == 0


def is_eval_seed(seed: int) -> bool:
    return seed % 2 == 1


@dataclass
class RegressionBatch:
    """A batch of regression problems, one per seed.

    ``weights``: ``W_i (B, dims[i+2], dims[i+1])``; ``X (B, d_in, b)``; ``Y (B, d_out, b)``; ``seeds``: length B.
    """

    weights: tuple[Tensor, ...]
    X: Tensor
    Y: Tensor
    seeds: list[int]
    dims: list[int]

    def to(self, device) -> "RegressionBatch":
        return RegressionBatch(tuple(w.to(device) for w in self.weights), self.X.to(device),
                               self.Y.to(device), list(self.seeds), list(self.dims))


def regression_problem(dims: Sequence[int], seed: int, dtype: torch.dtype | None = None,
                       device=None) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """One problem: ``(weights, X, Y)`` drawn from ``torch.Generator().manual_seed(seed)`` (CPU, so a seed
    gives the same numbers on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    W = init_uniform(dims, g, dtype=dtype)
    X, Y = regression_data(dims, g, dtype=dtype)
    return (tuple(w.to(device) for w in W), X.to(device), Y.to(device))


def regression_batch(dims: Sequence[int], seeds: Sequence[int], dtype: torch.dtype | None = None,
                     device=None) -> RegressionBatch:
    """Stack :func:`regression_problem` for every seed along a leading batch dimension."""
    if len(seeds) == 0:
        raise ValueError("need at least one seed")
    probs = [regression_problem(dims, s, dtype) for s in seeds]
    n_w = len(probs[0][0])
    W = tuple(torch.stack([p[0][i] for p in probs]).to(device) for i in range(n_w))
    X = torch.stack([p[1] for p in probs]).to(device)
    Y = torch.stack([p[2] for p in probs]).to(device)
    return RegressionBatch(W, X, Y, list(seeds), list(dims))
