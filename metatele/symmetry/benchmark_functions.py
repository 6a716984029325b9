"""SO(2) symmetries of two-dimensional benchmark functions (P1 section 5; docs/mathematics.md, section 3.7).

A loss written as ``L = u^2 + v^2`` with an invertible reparametrisation ``(u, v) = phi(x, y)`` is kept by
any rotation of ``(u, v)``: teleporting ``(x, y)`` means ``phi^{-1}(R_theta phi(x, y))``.

* Rosenbrock: ``L = 100 (x^2 - y)^2 + (x - 1)^2``, ``u = 10 (x^2 - y)``, ``v = x - 1``.
* Booth: ``L = (x + 2y - 7)^2 + (2x + y - 5)^2``, ``u = x + 2y - 7``, ``v = 2x + y - 5``.

Points are tensors ``(..., 2)`` holding ``(x, y)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["BenchmarkFunction", "ROSENBROCK", "BOOTH", "BENCHMARK_FUNCTIONS", "rotation", "so2_teleport"]


@dataclass(frozen=True)
class BenchmarkFunction:
    """A 2-D loss with its ``(u, v)`` coordinates: ``loss = u^2 + v^2``."""

    name: str
    to_uv: Callable[[Tensor], Tensor]
    from_uv: Callable[[Tensor], Tensor]

    def loss(self, p: Tensor) -> Tensor:
        """``L(x, y)``, shape ``(...)``."""
        return self.to_uv(p).pow(2).sum(-1)


def _rosen_uv(p: Tensor) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    return torch.stack([10 * (x ** 2 - y), x - 1], -1)


def _rosen_xy(q: Tensor) -> Tensor:
    u, v = q[..., 0], q[..., 1]
    x = v + 1
    return torch.stack([x, x ** 2 - u / 10], -1)


def _booth_uv(p: Tensor) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    return torch.stack([x + 2 * y - 7, 2 * x + y - 5], -1)


def _booth_xy(q: Tensor) -> Tensor:
    # [u + 7, v + 5] = [[1, 2], [2, 1]] [x, y]; the inverse matrix is [[-1, 2], [2, -1]] / 3
    a, c = q[..., 0] + 7, q[..., 1] + 5
    return torch.stack([(-a + 2 * c) / 3, (2 * a - c) / 3], -1)


ROSENBROCK = BenchmarkFunction("rosenbrock", _rosen_uv, _rosen_xy)
BOOTH = BenchmarkFunction("booth", _booth_uv, _booth_xy)
BENCHMARK_FUNCTIONS = {f.name: f for f in (ROSENBROCK, BOOTH)}


def rotation(theta: Tensor) -> Tensor:
    """SO(2) matrices ``(..., 2, 2)`` for angles ``theta (...)``."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def so2_teleport(fn: BenchmarkFunction, p: Tensor, theta: Tensor) -> Tensor:
    """Teleport ``p (..., 2)`` by the rotation of angle ``theta`` in ``(u, v)``: the loss is unchanged."""
    q = fn.to_uv(p)
    return fn.from_uv((rotation(theta) @ q.unsqueeze(-1)).squeeze(-1))
