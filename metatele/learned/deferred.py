"""Linear maps whose weight gradient is formed once per backward pass instead of once per use.

Meta-training unrolls ``K`` inner steps, and every step runs the same LSTM weights ``W (out, in)`` on a
small batch ``x_t (B, in)`` (``B = 1`` in the papers' setting). Plain autograd then forms ``K`` separate
weight gradients ``gy_t^T x_t`` (each a full ``out x in`` matrix, rank ``B``) and adds them into
``W.grad`` one by one: ``3 K`` passes over a matrix of the size of the weights, which dominates the
meta-gradient at small batch (the work is memory-bound, not arithmetic-bound).

:func:`deferred_linear` computes ``y = x W^T + b`` as usual but, in backward, returns only the
gradient of ``x`` (and of ``b``) and records ``(gy_t, x_t)``; when the backward pass ends, one callback
forms ``W.grad += [gy_1; ...; gy_K]^T [x_1; ...; x_K]``: one matrix product over all uses, the same
sum in a different order (equal to autograd's result up to floating-point rounding, tested).

``grad_rows`` (an index tensor, optional): only those rows of ``x`` need an input gradient; the others
get zero. It is a promise of the caller that nothing upstream of the other rows needs a gradient (e.g. rows
of a batch that are detached constants), and saves the part of ``gy W`` that would be thrown away.

Limits (why it is opt-in, see ``StackedLSTM.defer_weight_grad``): the weight's gradient is *accumulated
into* ``W.grad`` like ``Tensor.backward`` does, so it is meant for ``loss.backward()``; with
``torch.autograd.grad(..., inputs=[W])`` the weight would get no gradient. Backward passes of one process
are assumed not to run concurrently in several threads.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["deferred_linear"]

# graph-task id -> list of (weight, grad_output (N, out), input (N, in)), filled during one backward
_PENDING: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}


def _flush() -> None:
    """End of a backward pass: one ``gy^T x`` per weight, accumulated into ``weight.grad``."""
    task = torch._C._current_graph_task_id()
    records = _PENDING.pop(task, [])
    _PENDING.clear()  # records of a backward pass that raised before its end: never applied
    groups: dict[int, tuple[Tensor, list[Tensor], list[Tensor]]] = {}
    for w, gy, x in records:
        groups.setdefault(id(w), (w, [], []))[1].append(gy)
        groups[id(w)][2].append(x)
    for w, gys, xs in groups.values():
        g = torch.cat(gys).transpose(0, 1) @ torch.cat(xs)
        if w.grad is None:
            w.grad = g
        else:
            w.grad.add_(g)


class _DeferredLinear(Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, grad_rows: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.grad_rows = grad_rows
        return x @ weight.transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        x, weight = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            task = torch._C._current_graph_task_id()
            if task not in _PENDING:
                _PENDING[task] = []
                torch.autograd.Variable._execution_engine.queue_callback(_flush)
            _PENDING[task].append((weight, gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])))
        gx = None
        if ctx.needs_input_grad[0]:
            rows = ctx.grad_rows
            if rows is None:
                gx = gy @ weight
            else:  # the other rows' input gradient is not needed (module docstring)
                gx = gy.new_zeros(gy.shape[:-1] + weight.shape[1:])
                gx.index_copy_(0, rows, gy.index_select(0, rows) @ weight)
        return gx, None, None


def deferred_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                    grad_rows: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (``x (..., in)``, ``weight (out, in)``) with the weight gradient
    deferred to the end of the backward pass (module docstring); ``grad_rows``: the rows (first dimension)
    of ``x`` whose input gradient is needed, None for all. Plain ``F.linear`` when no graph is recorded or
    the weight needs no gradient."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    y = _DeferredLinear.apply(x, weight, grad_rows)
    return y if bias is None else y + bias
