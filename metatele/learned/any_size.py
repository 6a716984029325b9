"""A teleport LSTM for any layer width and any depth (docs/meta_learning.md, section 3.1).

P2's TeleportLSTM reads the two whole gradient matrices around a hidden layer of width ``k`` and writes a
``k x k`` matrix, so its parameters are tied to the widths. :class:`NeuronwiseTeleportLSTM` instead runs
one small LSTM shared by every hidden neuron of every hidden layer, as the coordinatewise update LSTM
(Andrychowicz et al. 2016) is shared by every coordinate.

Hidden layer ``i`` (width ``k``) sits between ``V = W_i (k, n_in)`` and ``U = W_{i+1} (n_out, k)``;
``G_V = dL/dV``, ``G_U = dL/dU`` (with biases, the bias column of ``U`` is not a neuron and is dropped;
the bias column of ``V`` is part of neuron ``j``'s incoming row). For neuron ``j``:

* statistics: ``r_in = rms_l G_V[j, l]``, ``m_in = mean_l G_V[j, l]``, ``r_out = rms_m G_U[m, j]``,
  ``m_out = mean_m G_U[m, j]``;
* features ``x_j`` (10 numbers): the log-sign preprocessing (Andrychowicz et al., appendix A,
  :func:`metatele.learned.preprocess.log_sign`) of the four statistics (8 channels), and the neuron's
  relative log scales ``ln r_in_j - mean_j' ln r_in_j'`` and ``ln r_out_j - mean_j' ln r_out_j'``
  (2 channels: how much more this neuron's gradients carry than its layer's average);
* ``h_j, state_j = LSTM(x_j, state_j)`` (two stacked cells, hidden ``H``, shared by all neurons and layers);
* ``[a_j (r), b_j (r), d_j (1)] = Linear(h_j)``; with ``A = [a_1; ...; a_k] (k, r)``, ``B`` likewise,
  ``D = A B^T + diag(d) (k, k)`` (rank-``r`` mixing of neurons plus a per-neuron rescaling);
* ``T = magnitude * s * D / ||D||_F`` with ``s = 1`` (``"fixed"``, as P2's TeleportLSTM) or
  ``s = sigmoid(mean_j Linear_s(h_j))`` (``"learned"``).

The group element of layer ``i`` is ``g = I + T`` (or ``exp(T)``), applied with the exact action of
:func:`metatele.learned.teleport.apply_learned_teleport`. Relabelling the neurons of a layer by a
permutation ``P`` permutes the features and gives ``P T P^T``: the proposal is equivariant, as the
symmetry it acts on is. With ``lr = True`` a step-size head reads the mean of ``h_j`` over every hidden
neuron: ``lr = lr_min (lr_max / lr_min)^sigmoid(Linear_lr(mean_j h_j))`` (or P2's ``clamp``), the
neuronwise counterpart of LrTeleportLSTM.

The number of parameters is ``O(H^2 + H r)``, independent of the network. State: ``((h_1, c_1),
(h_2, c_2))``, each ``(B * N, H)`` with ``N`` the number of hidden neurons of the network, rows ordered
trajectory-major (``reshape(B, N, H)``), neurons layer by layer.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..symmetry import normalise
from ..config import MAGNITUDE_MODES
from .lstm import LSTMState, StackedLSTM, bounded_step_size, linear, lr_head, magnitude_head
from .preprocess import log_sign

__all__ = ["NEURON_FEATURES", "neuron_statistics", "neuron_features", "hidden_widths", "low_rank_T",
           "NeuronwiseTeleportLSTM"]

#: Features per hidden neuron read by :class:`NeuronwiseTeleportLSTM`.
NEURON_FEATURES = 10


def hidden_widths(grads: Sequence[Tensor]) -> list[int]:
    """Widths ``k_i`` of the hidden layers of a network with weights (or gradients) ``(B, out, in)``."""
    return [int(g.shape[-2]) for g in grads[:-1]]


def neuron_statistics(g_in: Tensor, g_out: Tensor) -> Tensor:
    """Per-neuron statistics of one hidden layer of width ``k``.

    ``g_in (B, k, n_in)``: gradient of the weight into the layer (row ``j`` feeds neuron ``j``);
    ``g_out (B, n_out, k')`` with ``k' >= k``: gradient of the weight out of it (column ``j`` reads neuron
    ``j``; columns past ``k``, a bias column, are ignored). Returns ``(B, k, 4)``:
    ``[rms_in, mean_in, rms_out, mean_out]``.
    """
    k = g_in.shape[-2]
    if g_out.shape[-1] < k:
        raise ValueError(f"the gradient out of a hidden layer of width {k} has {g_out.shape[-1]} columns; "
                         f"need at least {k}")
    go = g_out[..., :k].transpose(-1, -2)  # (B, k, n_out)
    return torch.stack([g_in.pow(2).mean(-1).sqrt(), g_in.mean(-1), go.pow(2).mean(-1).sqrt(), go.mean(-1)], -1)


def neuron_features(g_in: Tensor, g_out: Tensor, p: float = 10.0) -> Tensor:
    """The ``NEURON_FEATURES`` inputs of every neuron of one hidden layer, ``(B, k, 10)`` (module docstring)."""
    s = neuron_statistics(g_in, g_out)
    c1, c2 = log_sign(s, p)
    log_r = torch.log(s[..., [0, 2]].clamp_min(math.exp(-p) ** 2))  # (B, k, 2)
    rel = log_r - log_r.mean(-2, keepdim=True)
    return torch.cat([c1, c2, rel], -1)


def low_rank_T(out: Tensor, rank: int, magnitude: float) -> Tensor:
    """``T = magnitude * D / ||D||_F`` with ``D = A B^T + diag(d)`` from the head outputs
    ``out (B, k, 2 r + 1) = [A | B | d]``; returns ``(B, k, k)``."""
    if out.shape[-1] != 2 * rank + 1:
        raise ValueError(f"head output has {out.shape[-1]} entries per neuron; rank {rank} needs {2 * rank + 1}")
    A, Bm, d = out[..., :rank], out[..., rank:2 * rank], out[..., 2 * rank]
    D = A @ Bm.transpose(-1, -2) + torch.diag_embed(d)
    return normalise(D, magnitude)


class NeuronwiseTeleportLSTM(nn.Module):
    """One LSTM shared by all hidden neurons: gradients of every weight -> one ``T`` per hidden layer.

    ``forward(grads, state) -> (Ts, lr, state)`` with ``grads`` the weights' gradients ``(B, out, in)``
    (at least two), ``Ts = [T_i (B, k_i, k_i)]`` for every hidden layer, ``||T_i||_F = magnitude``
    (times ``s`` in (0, 1) with ``magnitude_mode = "learned"``) and ``lr (B,)`` (``None`` unless ``lr``).
    """

    def __init__(self, hidden: int = 20, rank: int = 2, *, magnitude: float = 0.01, preprocess_p: float = 10.0,
                 magnitude_mode: str = "fixed", lr: bool = False, lr_min: float = 1e-7,
                 lr_max: float = 5e-3, lr_param: str = "clamp", lr_init: float = 1e-4):
        super().__init__()
        if magnitude_mode not in MAGNITUDE_MODES:
            raise ValueError(f"magnitude_mode = {magnitude_mode!r}; allowed: {list(MAGNITUDE_MODES)}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank = {rank!r} must be an integer >= 1")
        self.rank, self.magnitude, self.magnitude_mode = rank, float(magnitude), magnitude_mode
        self.preprocess_p = float(preprocess_p)
        self.lstm = StackedLSTM(NEURON_FEATURES, hidden)
        self.head = nn.Linear(hidden, 2 * rank + 1)
        self.mag_head = magnitude_head(hidden) if magnitude_mode == "learned" else None
        self.lr_head = lr_head(hidden, lr_min, lr_max, lr_param, lr_init) if lr else None
        self.lr_min, self.lr_max, self.lr_param = float(lr_min), float(lr_max), lr_param

    @property
    def hidden(self) -> int:
        return self.lstm.hidden

    def init_state(self, batch: int, dtype=None, device=None, *, n_neurons: int) -> LSTMState:
        """Zero state of ``batch`` trajectories of a network with ``n_neurons`` hidden neurons in all."""
        if n_neurons < 1:
            raise ValueError(f"n_neurons = {n_neurons} must be >= 1 (at least one hidden layer)")
        return self.lstm.init_state(batch * n_neurons, dtype, device)

    def features(self, grads: Sequence[Tensor]) -> Tensor:
        """``(B, N, 10)``: :func:`neuron_features` of every hidden layer, concatenated along neurons."""
        if len(grads) < 2:
            raise ValueError(f"need the gradients of at least two weights (one hidden layer), got {len(grads)}")
        return torch.cat([neuron_features(grads[i], grads[i + 1], self.preprocess_p) for i in range(len(grads) - 1)], -2)

    def step_size(self, h: Tensor) -> Tensor:
        """``lr (B,)`` from the mean hidden state ``h (B, H)``."""
        z = linear(self.lr_head, h, *self.lstm.deferral).squeeze(-1)
        return bounded_step_size(z, self.lr_min, self.lr_max, self.lr_param)

    def forward(self, grads: Sequence[Tensor], state: LSTMState
                ) -> tuple[list[Tensor], Tensor | None, LSTMState]:
        dt = self.head.weight.dtype
        x = self.features(grads).to(dt)
        B, N, F = x.shape
        if state[0][0].shape[0] != B * N:
            raise ValueError(f"state has {state[0][0].shape[0]} rows; {B} trajectories x {N} hidden neurons "
                             f"need {B * N} (init_state(n_neurons={N}))")
        h, state = self.lstm(x.reshape(B * N, F), state)
        defer = self.lstm.deferral
        out = linear(self.head, h, *defer).reshape(B, N, -1)
        h = h.reshape(B, N, -1)
        Ts, start = [], 0
        for k in hidden_widths(grads):
            T = low_rank_T(out[:, start:start + k], self.rank, self.magnitude)
            if self.mag_head is not None:
                s = torch.sigmoid(linear(self.mag_head, h[:, start:start + k], *defer).mean(-2))  # (B, 1)
                T = T * s.unsqueeze(-1)
            Ts.append(T)
            start += k
        lr = None if self.lr_head is None else self.step_size(h.mean(-2))
        return Ts, lr, state
