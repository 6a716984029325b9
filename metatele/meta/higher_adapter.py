"""The one place where metatele touches ``higher`` (facebookresearch/higher 0.2.1).

A learned update rule ``rule(weights, grads) -> new_weights`` (explicit tensors, see
:mod:`metatele.learned.methods`) becomes a ``higher`` differentiable optimiser over the functional
network's weights: :meth:`HigherStepper.step` takes the inner loss, lets ``higher`` compute the
gradient with ``create_graph=True`` and calls the rule, so the new weights carry the graph of the
whole unrolled step.

* ``first_order=True`` (P2): a ``grad_callback`` detaches the gradients, so the LSTMs see constants and
  the meta-gradient flows only through the weights' dependence on the LSTM outputs.
* ``first_order=False``: second-order meta-gradients through the gradients as well.

No module is monkey-patched and no optimiser state is kept inside ``higher``: the weights are passed
explicitly to every step and the references ``higher`` holds are dropped after each step, so nothing
survives a truncation window (docs/design.md, "Choices worth knowing").
"""
from __future__ import annotations

from typing import Callable, Sequence

import higher
import torch
from torch import Tensor

__all__ = ["Rule", "HigherStepper", "AutogradStepper", "NoGradStepper"]

Rule = Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]]


class _RuleOptimizer(higher.optim.DifferentiableOptimizer):
    """A ``higher`` differentiable optimiser whose update is an arbitrary function of (params, grads)."""

    rule: Rule | None = None

    def _update(self, grouped_grads, **kwargs) -> None:  # noqa: D401 - higher's hook
        group = self.param_groups[0]
        params, grads = tuple(group["params"]), tuple(grouped_grads[0])
        if self.rule is None:
            raise RuntimeError("no update rule set")
        new = self.rule(params, grads)
        for i, p in enumerate(new):
            group["params"][i] = p


def independent(weights: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Views of the weights through which the loss's gradient is the *partial* derivative in each weight.

    After a teleport of a network with two or more hidden layers, a weight is computed from the earlier
    transformed weights, so ``autograd.grad(L, weights)`` would return total derivatives (through that
    dependence) instead of the gradient the optimiser must see. A fresh view per weight is a new graph
    node that nothing else depends on; the graph still flows through it to the weights' history."""
    return tuple(w.view_as(w) for w in weights)


def _detach_all(grads):
    return [None if g is None else g.detach() for g in grads]


LossFn = Callable[[tuple[Tensor, ...]], Tensor]


class HigherStepper:
    """Differentiable inner steps through ``higher`` for a network with ``n_weights`` weight tensors.

    Steppers share one interface: ``loss_fn(weights) -> (B,)`` per-trajectory losses;
    ``grad(weights, loss_fn) -> (loss (B,), grads)`` and ``step(weights, loss_fn, rule) ->
    (loss (B,), rule(weights, grads), grads)``. Trajectories are independent, so the gradient of the
    summed loss is every trajectory's own gradient.
    """

    def __init__(self, n_weights: int, *, first_order: bool = True):
        self.first_order = bool(first_order)
        self._ref = [torch.zeros(1, requires_grad=True) for _ in range(n_weights)]
        base = torch.optim.SGD(self._ref, lr=0.0)
        self._opt = _RuleOptimizer(base, self._ref, grad_callback=_detach_all if first_order else None,
                                   track_higher_grads=True)

    def step(self, weights: Sequence[Tensor], loss_fn: LossFn, rule: Rule):
        weights = independent(weights)
        loss = loss_fn(weights)
        seen: dict[str, tuple[Tensor, ...]] = {}

        def wrapped(params, grads):
            seen["g"] = grads
            return rule(params, grads)

        self._opt.rule = wrapped
        try:
            new = self._opt.step(loss.sum(), params=list(weights))
        finally:
            self._opt.rule = None
            self._opt.param_groups[0]["params"] = [None] * len(self._ref)  # drop graph references
        return loss, tuple(new), seen["g"]

    def grad(self, weights: Sequence[Tensor], loss_fn: LossFn):
        """Loss and gradient alone (for a teleport before the update), same first/second-order rule."""
        weights = independent(weights)
        loss = loss_fn(weights)
        g = torch.autograd.grad(loss.sum(), list(weights), create_graph=not self.first_order,
                                retain_graph=True)
        return loss, (tuple(x.detach() for x in g) if self.first_order else tuple(g))


class AutogradStepper:
    """Plain-tensor reference of :class:`HigherStepper`: ``torch.autograd.grad`` directly, no ``higher``."""

    def __init__(self, n_weights: int = 0, *, first_order: bool = True):
        self.first_order = bool(first_order)

    def grad(self, weights: Sequence[Tensor], loss_fn: LossFn):
        weights = independent(weights)
        loss = loss_fn(weights)
        g = torch.autograd.grad(loss.sum(), list(weights), create_graph=not self.first_order,
                                retain_graph=True)
        return loss, (tuple(x.detach() for x in g) if self.first_order else tuple(g))

    def step(self, weights: Sequence[Tensor], loss_fn: LossFn, rule: Rule):
        loss, g = self.grad(weights, loss_fn)
        return loss, tuple(rule(tuple(weights), g)), g


class NoGradStepper:
    """Evaluation: the gradient of detached weights is taken in a local ``enable_grad`` block, everything
    else (the rule, the LSTMs, the teleport) runs under ``torch.no_grad``, so no graph ever grows."""

    first_order = True

    def __init__(self, n_weights: int = 0, **_):
        pass

    def grad(self, weights: Sequence[Tensor], loss_fn: LossFn):
        with torch.enable_grad():
            w = tuple(x.detach().requires_grad_(True) for x in weights)
            loss = loss_fn(w)
            g = torch.autograd.grad(loss.sum(), list(w))
        return loss.detach(), tuple(x.detach() for x in g)

    def step(self, weights: Sequence[Tensor], loss_fn: LossFn, rule: Rule):
        loss, g = self.grad(weights, loss_fn)
        with torch.no_grad():
            new = tuple(rule(tuple(x.detach() for x in weights), g))
        return loss, new, g
