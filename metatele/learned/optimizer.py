"""A trained meta-optimiser as a drop-in ``torch.optim``-style optimiser.

::

    opt = LearnedOptimizer.from_checkpoint("checkpoints/lstm_update_tele.pt", model.parameters())
    for xb, yb in batches:
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()                 # learned update (or learned step size) from p.grad
        opt.teleport(model, xb)    # learned group element, exact action on this batch

The parameters must have the shapes the meta-optimiser was trained for (a full-vector UpdateLSTM reads
all of them at once; the coordinatewise UpdateLSTM works for any shapes but still needs the trained
hidden-layer widths for P2's teleport LSTM). A size-agnostic method (coordinatewise update and
``lstm.tele_arch = "neuronwise"``, :attr:`LearnedMethod.size_agnostic`) works for any ``nn.Sequential`` of
``nn.Linear`` (with or without biases) and ``nn.LeakyReLU``: its LSTMs are moved to the parameters' shapes
(:meth:`LearnedMethod.resized`). The recurrent state is one trajectory (batch 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from ..checkpoint import ProblemMismatch
from ..nets import forward, to_sequential
from ..teleport import default_loss_tol, model_weights, module_inputs
from .methods import LearnedMethod
from .teleport import action_dtype, apply_learned_teleport
from .loading import load_method

__all__ = ["LearnedOptimizer"]


class LearnedOptimizer:
    """Applies a :class:`LearnedMethod` to ``params`` (tensors with ``.grad``), one step at a time."""

    def __init__(self, params: Iterable[Tensor], method: LearnedMethod):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("LearnedOptimizer got an empty parameter list")
        shapes = [tuple(p.shape) for p in self.params]
        if method.size_agnostic:
            if any(p.dim() not in (1, 2) for p in self.params):
                raise ValueError(f"a size-agnostic LearnedOptimizer takes weights (out, in) and biases (out,), "
                                 f"got parameter shapes {shapes}")
            method = method.resized([s for s in shapes if len(s) == 2])
        self.method = method.eval()
        coordinatewise = method.update_net is not None and method.lstm_cfg.update_arch == "coordinatewise"
        if not (coordinatewise or method.size_agnostic) and shapes != [tuple(s) for s in method.shapes]:
            raise ProblemMismatch(f"parameters of shapes {shapes} do not match the shapes the meta-optimiser "
                                  f"was trained for {method.shapes}")
        self._n_params = sum(p.numel() for p in self.params)
        dt = next(method.parameters()).dtype
        self.state = method.init_state(1, dtype=dt, device=self.params[0].device)
        if coordinatewise:
            self.state["update"] = method.update_net.init_state(1, dt, self.params[0].device,
                                                                n_params=self._n_params)
        self._last_grads: tuple[Tensor, ...] | None = None
        self.last_teleport_rejected: str | None = None
        self.steps = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, params: Iterable[Tensor]) -> "LearnedOptimizer":
        """Load a ``train_meta.py`` checkpoint (typed :mod:`metatele.checkpoint` errors on failure)."""
        method, _, _ = load_method(path)
        return cls(params, method)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def _grads(self) -> tuple[Tensor, ...]:
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise ValueError(f"parameters {missing} have no .grad: call loss.backward() before step()")
        return tuple(p.grad.detach().unsqueeze(0) for p in self.params)

    @torch.no_grad()
    def step(self, closure=None):
        """One learned update of every parameter from its ``.grad`` (``closure`` as in ``torch.optim``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._grads()
        weights = tuple(p.detach().unsqueeze(0) for p in self.params)
        new, self.state = self.method.propose_update(weights, grads, self.state)
        for p, w in zip(self.params, new):
            p.copy_(w.squeeze(0))
        self._last_grads = grads
        self.steps += 1
        return loss

    @torch.no_grad()
    def teleport(self, model: nn.Sequential, inputs: Tensor) -> bool:
        """Teleport ``model`` (``nn.Sequential`` of ``nn.Linear`` and ``nn.LeakyReLU``, no biases for the
        paper's shapes) with the learned group element on the batch ``inputs`` ``(b, features)``.

        The teleport LSTM reads the gradients of the last :meth:`step` (P2's order: update, then
        teleport). Returns False (and does nothing) for a method without a learned teleport.

        Guarded like :func:`metatele.teleport.teleport`: ``inputs`` must be a non-empty, finite, floating-point
        ``(batch, features)`` tensor matching the model's input width, and the model float32 or float64 with
        finite weights (``TypeError`` / ``ValueError`` naming the argument otherwise). A teleport whose weights
        would be non-finite, or whose outputs on ``inputs`` would move by more than
        :func:`metatele.teleport.default_loss_tol` of the model's dtype (relative, in norm; an exact action keeps
        them; the linearised action is allowed its second-order error, ``10 magnitude^2``), is not applied: the model is left unchanged, False is returned and
        :attr:`last_teleport_rejected` says why (``None`` after an applied teleport).
        """
        if self.method.tele_nets is None:
            return False
        if self._last_grads is None:
            raise ValueError("call step() before teleport(): the teleport LSTM reads the step's gradients")
        weights, slope, bias = model_weights(model)  # float32/float64, finite
        X = module_inputs(inputs, weights[0].dtype, weights[0].device)  # columns (features, b), validated
        d_in = weights[0].shape[-1] - (1 if bias else 0)
        if X.shape[0] != d_in:
            raise ValueError(f"inputs have {X.shape[0]} features per sample but the model's first layer takes "
                             f"{d_in}")
        grads = self._layer_grads(model) if bias else self._last_grads
        Ts, self.state = self.method.propose_teleport(grads, self.state)
        c = self.method.tele_cfg
        Xa = torch.cat([X, torch.ones(1, X.shape[1], dtype=X.dtype, device=X.device)]) if bias else X
        X_pinv = torch.linalg.pinv(Xa.to(action_dtype(X.dtype, c.compute_dtype)))
        new = apply_learned_teleport(weights, X, [T[0].to(weights[0].dtype) for T in Ts], action=c.action,
                                     param=c.param, compute_dtype=c.compute_dtype, X_pinv=X_pinv,
                                     slope=slope, bias=bias)
        self.last_teleport_rejected = None
        if not all(bool(torch.isfinite(w).all()) for w in new):
            self.last_teleport_rejected = "non-finite weights"
            return False
        out0 = forward(weights, X, slope=slope, bias=bias).double()
        out1 = forward(new, X, slope=slope, bias=bias).double()
        change = float(torch.linalg.norm(out1 - out0) / torch.linalg.norm(out0).clamp_min(1e-300))
        tol = default_loss_tol(weights[0].dtype)
        if c.action == "linearised":  # P2's first-order action: its error O(||T||^2) is by design
            tol = max(tol, 10 * c.magnitude ** 2)
        if not change <= tol:
            self.last_teleport_rejected = (f"outputs on the batch would move by {change:.3g} relative (> {tol:.3g}): "
                                           f"the action is not exact on this batch")
            return False
        to_sequential(new, model)
        return True

    def _layer_grads(self, model: nn.Sequential) -> tuple[Tensor, ...]:
        """The last step's gradients arranged as ``from_sequential``'s weights: ``[dL/dW | dL/db]`` per
        ``nn.Linear`` with a bias, ``(1, out, in + 1)``."""
        where = {id(p): i for i, p in enumerate(self.params)}
        out = []
        for m in model.modules():
            if isinstance(m, nn.Linear):
                if id(m.weight) not in where or id(m.bias) not in where:
                    raise ValueError(f"{m} of the model is not among the optimiser's parameters")
                gw, gb = self._last_grads[where[id(m.weight)]], self._last_grads[where[id(m.bias)]]
                out.append(torch.cat([gw, gb.unsqueeze(-1)], -1))
        return tuple(out)

    @property
    def lr(self) -> float:
        """Current step size of LSTM(lr,tele) (its last proposal; ``lstm.lr_init`` before the first)."""
        return float(self.state["lr"].reshape(-1)[0])
