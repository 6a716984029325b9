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

``dtype`` (optional, e.g. ``torch.bfloat16``): mixed precision. The three matrix products (``x W^T``, ``gy W``
and the deferred ``gy^T x``) run on ``x``, ``W`` and ``gy`` rounded to ``dtype`` (the kernels accumulate in
float32), and their results are returned in ``x``'s dtype. The weight is rounded at its use and the rounded
copy kept for the backward pass; inside :func:`reuse_casts` (the meta-trainer's forward pass over one
truncation window, during which the weights do not change) each weight is rounded once. A cache keyed on
the weights' version counters would go stale: the fused Adam step changes weights without bumping them.
``W.grad``, the bias and everything outside the products keep their dtype. On a CPU with bfloat16
instructions (AVX512-BF16) the products are about 2x faster at the meta-trainer's sizes
(``benchmarks/meta_precision.py``); the result is rounded, not bit-equal.

Limits (why it is opt-in, see ``StackedLSTM.defer_weight_grad``): the weight's gradient is *accumulated
into* ``W.grad`` like ``Tensor.backward`` does, so it is meant for ``loss.backward()``; with
``torch.autograd.grad(..., inputs=[W])`` the weight would get no gradient. Backward passes of one process
are assumed not to run concurrently in several threads.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["deferred_linear", "reuse_casts"]

# id(weight) -> (weight, weight rounded to the products' dtype), while reuse_casts() is active
_CASTS: dict[int, tuple[Tensor, Tensor]] | None = None


@contextmanager
def reuse_casts() -> Iterator[None]:
    """A block in which the weights do not change: each one is rounded to the products' dtype once, at its
    first use, instead of at every use (see the module docstring). Nested blocks share the outer one's."""
    global _CASTS
    outer = _CASTS
    if outer is None:
        _CASTS = {}
    try:
        yield
    finally:
        _CASTS = outer


def _rounded(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight`` in ``dtype`` (detached), from the :func:`reuse_casts` cache when one is active."""
    if _CASTS is None:
        return weight.detach().to(dtype)
    c = _CASTS.get(id(weight))
    if c is None or c[0] is not weight or c[1].dtype != dtype:
        c = (weight, weight.detach().to(dtype))
        _CASTS[id(weight)] = c
    return c[1]


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
        g = (torch.cat(gys).transpose(0, 1) @ torch.cat(xs)).to(w.dtype)
        if w.grad is None:
            w.grad = g
        else:
            w.grad.add_(g)


class _DeferredLinear(Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, grad_rows: Tensor | None, dtype: torch.dtype | None) -> Tensor:
        ctx.grad_rows, ctx.low = grad_rows, dtype
        if dtype is None:
            ctx.save_for_backward(x, weight)
            return x @ weight.transpose(0, 1)
        x_low, w_low = x.to(dtype), _rounded(weight, dtype)
        ctx.save_for_backward(x_low, weight, w_low)
        return (x_low @ w_low.transpose(0, 1)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        x, weight, *low = ctx.saved_tensors
        out_dtype, W = gy.dtype, weight
        if ctx.low is not None:
            gy, W = gy.to(ctx.low), low[0]
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
                gx = (gy @ W).to(out_dtype)
            else:  # the other rows' input gradient is not needed (module docstring)
                gx = gy.new_zeros(gy.shape[:-1] + weight.shape[1:], dtype=out_dtype)
                gx.index_copy_(0, rows, (gy.index_select(0, rows) @ W).to(out_dtype))
        return gx, None, None, None


def deferred_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                    grad_rows: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (``x (..., in)``, ``weight (out, in)``) with the weight gradient
    deferred to the end of the backward pass (module docstring); ``grad_rows``: the rows (first dimension)
    of ``x`` whose input gradient is needed, None for all; ``dtype``: the products' precision (None: the
    weight's; see the module docstring). Plain ``F.linear`` when no graph is recorded or the weight needs no
    gradient."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    if dtype == weight.dtype:
        dtype = None
    y = _DeferredLinear.apply(x, weight, grad_rows, dtype)
    return y if bias is None else y + bias
