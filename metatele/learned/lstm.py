"""The meta-optimisers of P2 (section 6): two stacked LSTM cells plus linear heads.

Every module keeps its recurrent state explicit: ``init_state(B)`` returns it and ``forward`` takes and
returns it, so a batch of ``B`` trajectories (one row each) runs through one call and the trainer decides
where the graph is cut (``detach_state``). State layout: ``((h_1, c_1), (h_2, c_2))``, each ``(B, hidden)``
(or ``(B * P, hidden)`` for the coordinatewise LSTM).

* :class:`UpdateLSTM`: flattened gradient of all weights ``(B, P)`` -> update ``(B, P)``; the inner
  step is ``w <- w - update`` (P2, paper sizes P = 800, hidden 300). The head's output is the update
  itself (``"direct"``, P2) or a per-coordinate log step size (``"precond"``, an option of metatele).
* :class:`CoordinateUpdateLSTM`: one small LSTM shared by all coordinates (Andrychowicz et al. 2016),
  ``(B, P)`` -> ``(B, P)`` for any ``P``.
* :class:`TeleportLSTM`: gradients of the two weights around a hidden layer of width ``k``
  ``(B, n_in)`` -> ``T (B, k, k)`` with ``||T||_F = magnitude`` (P2: hidden 300, magnitude 0.01).
* :class:`LrTeleportLSTM`: as TeleportLSTM (P2: hidden 20) plus a step size ``(B,)`` in
  ``[lr_min, lr_max]`` (P2: [1e-7, 5e-3]).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import LR_PARAMS, MAGNITUDE_MODES, UPDATE_PARAMS
from ..symmetry import normalise
from .deferred import deferred_linear
from .preprocess import preprocess, preprocessed_width

__all__ = ["LSTMState", "lstm_cell", "linear", "StackedLSTM", "UpdateLSTM", "CoordinateUpdateLSTM", "TeleportLSTM",
           "LrTeleportLSTM", "detach_state"]

LSTMState = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]


def detach_state(state: LSTMState) -> LSTMState:
    """Cut the graph behind a recurrent state (truncated BPTT window boundary)."""
    return tuple((h.detach(), c.detach()) for h, c in state)  # type: ignore[return-value]


def lstm_cell(x: Tensor, state: tuple[Tensor, Tensor], cell: nn.LSTMCell, defer: bool = False,
              x_grad_rows: Tensor | None = None, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """One ``nn.LSTMCell`` step ``(h, c) -> (h', c')`` (Hochreiter and Schmidhuber's gates in PyTorch's
    ``i, f, g, o`` order). ``defer=True`` forms the gradients of ``weight_ih`` and ``weight_hh`` once per
    backward pass (:mod:`metatele.learned.deferred`); otherwise the fused ``nn.LSTMCell`` kernel runs.
    ``x_grad_rows`` (with ``defer``): the rows of ``x`` whose gradient is needed, None for all; ``dtype`` (with
    ``defer``): the precision of the matrix products, None for the weights' (both: see
    :func:`~metatele.learned.deferred.deferred_linear`)."""
    if not (defer and torch.is_grad_enabled()):
        return cell(x, state)
    h, c = state
    gates = (deferred_linear(x, cell.weight_ih, cell.bias_ih, x_grad_rows, dtype)
             + deferred_linear(h, cell.weight_hh, cell.bias_hh, dtype=dtype))
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def linear(layer: nn.Linear, x: Tensor, defer: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """``layer(x)``, with the weight gradient deferred when ``defer``, in ``dtype`` (see :func:`lstm_cell`)."""
    return deferred_linear(x, layer.weight, layer.bias, dtype=dtype) if defer else layer(x)


def magnitude_head(hidden: int) -> nn.Linear:
    """Head of the learned teleport distance ``s = sigmoid(head(h))``, initialised so that ``s`` starts
    near 0.88 (``teleport.magnitude_mode = "learned"``)."""
    head = nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.mul_(0.1)
        head.bias.fill_(2.0)
    return head


def lr_head(hidden: int, lr_min: float, lr_max: float, lr_param: str, lr_init: float) -> nn.Linear:
    """Head of a learned step size (see :func:`bounded_step_size`), with the range checked. With
    ``"log_sigmoid"`` its bias is set so that the untrained head proposes ``lr_init`` (weight scaled by 0.1)."""
    if not 0 < lr_min < lr_max:
        raise ValueError(f"need 0 < lr_min < lr_max, got lr_min={lr_min}, lr_max={lr_max}")
    if lr_param not in LR_PARAMS:
        raise ValueError(f"lr_param = {lr_param!r}; allowed: {list(LR_PARAMS)}")
    if not lr_min <= lr_init <= lr_max:
        raise ValueError(f"lr_init = {lr_init} must lie in [lr_min, lr_max] = [{lr_min}, {lr_max}]")
    head = nn.Linear(hidden, 1)
    if lr_param == "log_sigmoid":
        frac = (math.log(lr_init) - math.log(lr_min)) / (math.log(lr_max) - math.log(lr_min))
        frac = min(max(frac, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            head.weight.mul_(0.1)
            head.bias.fill_(math.log(frac / (1 - frac)))
    return head


def bounded_step_size(z: Tensor, lr_min: float, lr_max: float, lr_param: str) -> Tensor:
    """Step size from the head's output ``z``: ``clamp(z, lr_min, lr_max)`` (P2, ``"clamp"``) or
    ``lr_min (lr_max / lr_min)^sigmoid(z)`` (``"log_sigmoid"``)."""
    if lr_param == "clamp":
        return z.clamp(lr_min, lr_max)
    return lr_min * torch.exp(torch.sigmoid(z) * math.log(lr_max / lr_min))


class StackedLSTM(nn.Module):
    """Two stacked ``nn.LSTMCell``s: ``x (N, n_in) -> h_2 (N, hidden)``.

    ``defer_weight_grad`` (default False; the meta-trainer switches it on): form each weight's gradient
    once per backward pass with one matrix product over all unrolled steps instead of one per step
    (:mod:`metatele.learned.deferred`); the same gradient, about 2x less backward time at batch 1.
    """

    def __init__(self, n_in: int, hidden: int):
        super().__init__()
        if n_in < 1 or hidden < 1:
            raise ValueError(f"LSTM sizes must be >= 1, got n_in={n_in}, hidden={hidden}")
        self.n_in, self.hidden = int(n_in), int(hidden)
        self.cell1 = nn.LSTMCell(self.n_in, self.hidden)
        self.cell2 = nn.LSTMCell(self.hidden, self.hidden)
        self.defer_weight_grad = False
        self.matmul_dtype: torch.dtype | None = None  # with defer_weight_grad: the products' precision

    @property
    def deferral(self) -> tuple[bool, torch.dtype | None]:
        """``(defer_weight_grad, matmul_dtype)``, the arguments of :func:`linear` for this LSTM's heads."""
        return self.defer_weight_grad, self.matmul_dtype

    def init_state(self, n: int, dtype=None, device=None) -> LSTMState:
        z = lambda: torch.zeros(n, self.hidden, dtype=dtype, device=device)  # noqa: E731
        return ((z(), z()), (z(), z()))

    def forward(self, x: Tensor, state: LSTMState, x_grad_rows: Tensor | None = None
                ) -> tuple[Tensor, LSTMState]:
        """``x_grad_rows``: the rows of ``x`` whose gradient is needed (None: all; see :func:`lstm_cell`)."""
        h1, c1 = lstm_cell(x, state[0], self.cell1, self.defer_weight_grad, x_grad_rows, self.matmul_dtype)
        h2, c2 = lstm_cell(h1, state[1], self.cell2, self.defer_weight_grad, dtype=self.matmul_dtype)
        return h2, ((h1, c1), (h2, c2))


class _GradLSTM(nn.Module):
    """Shared plumbing: preprocessing of the gradient input, state creation."""

    def __init__(self, n_in: int, hidden: int, preprocess: str = "none", preprocess_p: float = 10.0,
                 input_scale: float = 1.0):
        super().__init__()
        self.n_in = int(n_in)
        self.preprocess_kind = preprocess
        self.preprocess_p = float(preprocess_p)
        self.input_scale = float(input_scale)
        self.lstm = StackedLSTM(preprocessed_width(self.n_in, preprocess), hidden)

    @property
    def hidden(self) -> int:
        return self.lstm.hidden

    def init_state(self, batch: int, dtype=None, device=None) -> LSTMState:
        return self.lstm.init_state(batch, dtype, device)

    def _features(self, g: Tensor) -> Tensor:
        if g.shape[-1] != self.n_in:
            raise ValueError(f"{type(self).__name__} expects {self.n_in} gradient entries per trajectory, "
                             f"got {g.shape[-1]}")
        return preprocess(g, self.preprocess_kind, p=self.preprocess_p, scale=self.input_scale)


def _output_update(out: Tensor, grad: Tensor, update_param: str, update_scale: float, update_clamp: float,
                   precond_lr: float, precond_range: float) -> Tensor:
    """Turn a head output into an update (pure function).

    ``"direct"`` (P2): ``clamp(update_scale * out, -update_clamp, update_clamp)``.
    ``"precond"``: ``precond_lr * exp(precond_range * tanh(out)) * grad``, a learned positive per-coordinate
    step size; the update vanishes with the gradient, so a converged trajectory stays converged.
    """
    if update_param == "direct":
        return (update_scale * out).clamp(-update_clamp, update_clamp)
    if update_param == "precond":
        return precond_lr * torch.exp(precond_range * torch.tanh(out)) * grad.to(out.dtype)
    raise ValueError(f"update parametrisation {update_param!r}; allowed: {list(UPDATE_PARAMS)}")


class UpdateLSTM(_GradLSTM):
    """P2's LSTM(update): ``update = clamp(scale * Linear(h_2), -clamp, clamp)``; inner step ``w - update``.

    With ``update_param = "precond"``: ``update = precond_lr * exp(precond_range * tanh(Linear(h_2))) * grad``.
    ``forward(grad (B, P), state) -> (update (B, P), state)``.
    """

    def __init__(self, n_params: int = 800, hidden: int = 300, *, preprocess: str = "none",
                 preprocess_p: float = 10.0, input_scale: float = 1.0, update_scale: float = 1.0,
                 update_clamp: float = 1e7, update_param: str = "direct", precond_lr: float = 3e-4,
                 precond_range: float = 3.0):
        super().__init__(n_params, hidden, preprocess, preprocess_p, input_scale)
        self.head = nn.Linear(hidden, n_params)
        self.update_scale, self.update_clamp = float(update_scale), float(update_clamp)
        self.update_param, self.precond_lr = update_param, float(precond_lr)
        self.precond_range = float(precond_range)
        if update_param == "precond":  # start as GD with step precond_lr
            with torch.no_grad():
                self.head.weight.mul_(0.1)
                self.head.bias.zero_()

    def forward(self, grad: Tensor, state: LSTMState, grad_rows: Tensor | None = None
                ) -> tuple[Tensor, LSTMState]:
        """``grad_rows``: the trajectories whose ``grad`` carries a graph the meta-gradient needs (the others
        are constants); None: all. It only saves work."""
        h, state = self.lstm(self._features(grad), state, grad_rows)
        out = linear(self.head, h, *self.lstm.deferral)
        u = _output_update(out, grad, self.update_param, self.update_scale, self.update_clamp, self.precond_lr,
                           self.precond_range)
        return u, state


class CoordinateUpdateLSTM(nn.Module):
    """Coordinatewise LSTM optimiser (Andrychowicz et al. 2016): one LSTM with ``hidden`` units shared by
    every coordinate; input the log-magnitude and sign of the gradient coordinate (always ``log_sign``),
    output ``update_scale * Linear(h)``; inner step ``w - update``.

    ``forward(grad (B, P), state) -> (update (B, P), state)``; the state is ``(B * P, hidden)``.
    """

    def __init__(self, hidden: int = 20, *, preprocess_p: float = 10.0, update_scale: float = 0.1,
                 update_clamp: float = 1e7, update_param: str = "direct", precond_lr: float = 3e-4,
                 precond_range: float = 3.0):
        super().__init__()
        self.preprocess_p, self.update_scale, self.update_clamp = float(preprocess_p), float(update_scale), float(update_clamp)
        self.update_param, self.precond_lr = update_param, float(precond_lr)
        self.precond_range = float(precond_range)
        self.lstm = StackedLSTM(2, hidden)
        self.head = nn.Linear(hidden, 1)
        if update_param == "precond":
            with torch.no_grad():
                self.head.weight.mul_(0.1)
                self.head.bias.zero_()

    @property
    def hidden(self) -> int:
        return self.lstm.hidden

    def init_state(self, batch: int, dtype=None, device=None, *, n_params: int) -> LSTMState:
        return self.lstm.init_state(batch * n_params, dtype, device)

    def forward(self, grad: Tensor, state: LSTMState, grad_rows: Tensor | None = None
                ) -> tuple[Tensor, LSTMState]:
        """``grad_rows`` is accepted for the interface of :class:`UpdateLSTM` and not used (every row's input
        gradient is formed)."""
        B, P = grad.shape
        x = preprocess(grad.reshape(B * P, 1), "log_sign", p=self.preprocess_p)
        h, state = self.lstm(x, state)
        out = linear(self.head, h, *self.lstm.deferral).reshape(B, P)
        u = _output_update(out, grad, self.update_param, self.update_scale, self.update_clamp, self.precond_lr,
                           self.precond_range)
        return u, state


class TeleportLSTM(_GradLSTM):
    """P2's teleport LSTM for one hidden layer of width ``k``.

    ``forward(grad_pair (B, n_in), state) -> (T (B, k, k), state)`` with ``grad_pair`` the concatenated
    flattened gradients of the weight into and the weight out of the hidden layer, and
    ``||T||_F = magnitude`` (P2: 0.01).
    """

    def __init__(self, n_in: int = 800, k: int = 20, hidden: int = 300, *, magnitude: float = 0.01,
                 preprocess: str = "none", preprocess_p: float = 10.0, input_scale: float = 1.0,
                 magnitude_mode: str = "fixed"):
        super().__init__(n_in, hidden, preprocess, preprocess_p, input_scale)
        if magnitude_mode not in MAGNITUDE_MODES:
            raise ValueError(f"magnitude_mode = {magnitude_mode!r}; allowed: {list(MAGNITUDE_MODES)}")
        self.k, self.magnitude, self.magnitude_mode = int(k), float(magnitude), magnitude_mode
        self.head = nn.Linear(hidden, self.k * self.k)
        # ||T|| = magnitude * sigmoid(mag_head(h)) with magnitude_mode = "learned"
        self.mag_head = magnitude_head(hidden) if magnitude_mode == "learned" else None

    def _T(self, h: Tensor) -> Tensor:
        """``T = magnitude * s * D / ||D||_F`` with ``D`` the head's ``k x k`` output and ``s = 1`` (P2,
        ``"fixed"``) or ``s = sigmoid(mag_head(h))`` in ``(0, 1)`` (``"learned"``: how far to teleport)."""
        T = normalise(linear(self.head, h, *self.lstm.deferral).reshape(h.shape[0], self.k, self.k),
                      self.magnitude)
        if self.mag_head is not None:
            T = T * torch.sigmoid(linear(self.mag_head, h, *self.lstm.deferral)).unsqueeze(-1)
        return T

    def forward(self, grad_pair: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        h, state = self.lstm(self._features(grad_pair), state)
        return self._T(h), state


class LrTeleportLSTM(TeleportLSTM):
    """P2's LSTM(lr, tele): a TeleportLSTM (hidden 20) with a second head for the step size.

    ``forward(grad_pair, state) -> (T (B, k, k), lr (B,), state)``.
    ``lr_param = "clamp"``: ``lr = clamp(Linear(h), lr_min, lr_max)`` (P2);
    ``lr_param = "log_sigmoid"``: ``lr = lr_min (lr_max / lr_min)^sigmoid(Linear(h))``, with the head's bias
    set so that the untrained LSTM proposes ``lr_init`` (and its weight scaled by 0.1).
    """

    def __init__(self, n_in: int = 800, k: int = 20, hidden: int = 20, *, magnitude: float = 0.01,
                 preprocess: str = "none", preprocess_p: float = 10.0, input_scale: float = 1.0,
                 lr_min: float = 1e-7, lr_max: float = 5e-3, lr_param: str = "clamp",
                 lr_init: float = 1e-4, magnitude_mode: str = "fixed"):
        super().__init__(n_in, k, hidden, magnitude=magnitude, preprocess=preprocess, preprocess_p=preprocess_p,
                         input_scale=input_scale, magnitude_mode=magnitude_mode)
        self.lr_head = lr_head(hidden, lr_min, lr_max, lr_param, lr_init)
        self.lr_min, self.lr_max, self.lr_param = float(lr_min), float(lr_max), lr_param

    def step_size(self, h: Tensor) -> Tensor:
        z = linear(self.lr_head, h, *self.lstm.deferral).squeeze(-1)
        return bounded_step_size(z, self.lr_min, self.lr_max, self.lr_param)

    def forward(self, grad_pair: Tensor, state: LSTMState):  # type: ignore[override]
        h, state = self.lstm(self._features(grad_pair), state)
        return self._T(h), self.step_size(h), state
