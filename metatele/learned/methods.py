"""The three learned methods of P2's Figure 6 as one module each (docs/meta_learning.md, section 2).

| method             | update                         | teleport (every ``teleport.every`` steps) |
|--------------------|--------------------------------|-------------------------------------------|
| ``lstm_update``      | ``w - UpdateLSTM(grad)``         | none                                      |
| ``lstm_update_tele`` | ``w - UpdateLSTM(grad)``         | ``T`` from a TeleportLSTM per hidden layer  |
| ``lstm_lr_tele``     | ``w - lr_t grad`` (GD)           | ``T`` and ``lr_{t+1}`` from an LrTeleportLSTM |

A :class:`LearnedMethod` holds the LSTMs and exposes the two pieces of one inner step as functions of
explicit tensors (``propose_update``, ``propose_teleport``) plus ``teleport`` (the group action); the
order in which the unroller calls them is ``teleport.order`` (see :mod:`metatele.meta.unroll`).
The recurrent state is a dict ``{"update": LSTMState | None, "tele": [LSTMState] | None, "lr": (B,)}``.

``lstm.tele_arch = "neuronwise"`` replaces the per-layer teleport LSTMs by one
:class:`~metatele.learned.any_size.NeuronwiseTeleportLSTM` shared by every hidden neuron of every layer
(``tele_nets`` then holds that one module, ``state["tele"]`` its one state). With that and
``lstm.update_arch = "coordinatewise"`` (or GD's update) no parameter depends on the widths or the depth:
:attr:`LearnedMethod.size_agnostic`, and :meth:`LearnedMethod.resized` moves the trained LSTMs to
another network.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..config import METHODS, LSTMConfig, TeleportConfig
from ..nets import flatten, unflatten
from .any_size import NeuronwiseTeleportLSTM
from .lstm import CoordinateUpdateLSTM, LrTeleportLSTM, StackedLSTM, TeleportLSTM, UpdateLSTM, detach_state
from .teleport import apply_learned_teleport

__all__ = ["LearnedMethod", "weight_shapes", "pair_gradients"]


def weight_shapes(dims: Sequence[int]) -> list[tuple[int, int]]:
    """Weight shapes ``(out, in)`` of the problem ``dims = [b, d_in, h_1, ..., d_out]``."""
    return [(int(dims[i + 2]), int(dims[i + 1])) for i in range(len(dims) - 2)]


def pair_gradients(grads: Sequence[Tensor], i: int) -> Tensor:
    """Input of the teleport LSTM of hidden layer ``i``: ``[vec dL/dW_i, vec dL/dW_{i+1}]`` ``(B, n_in)``."""
    B = grads[i].shape[0]
    return torch.cat([grads[i].reshape(B, -1), grads[i + 1].reshape(B, -1)], dim=-1)


class LearnedMethod(nn.Module):
    """A learned optimiser for networks with weights of shapes ``shapes`` (``[(out, in), ...]``).

    name: one of ``lstm_update_tele``, ``lstm_update``, ``lstm_lr_tele``.
    """

    def __init__(self, name: str, shapes: Sequence[tuple[int, int]], lstm: LSTMConfig | None = None,
                 teleport: TeleportConfig | None = None):
        super().__init__()
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; allowed: {list(METHODS)}")
        if len(shapes) < 2:
            raise ValueError(f"need at least two weights (one hidden layer), got shapes {list(shapes)}")
        lstm = lstm or LSTMConfig()
        self.tele_cfg = teleport or TeleportConfig()
        self.lstm_cfg = lstm
        self.name = name
        self.shapes = [tuple(int(x) for x in s) for s in shapes]
        self.n_params = sum(o * i for o, i in self.shapes)
        self.learn_update = name in ("lstm_update", "lstm_update_tele")
        self.learn_tele = name in ("lstm_update_tele", "lstm_lr_tele")
        self.learn_lr = name == "lstm_lr_tele"
        self.update_net: nn.Module | None = None
        if self.learn_update:
            if lstm.update_arch == "full":
                self.update_net = UpdateLSTM(self.n_params, lstm.update_hidden, preprocess=lstm.preprocess,
                                             preprocess_p=lstm.preprocess_p, input_scale=lstm.input_scale,
                                             update_scale=lstm.update_scale, update_clamp=lstm.update_clamp,
                                             update_param=lstm.update_param, precond_lr=lstm.precond_lr,
                                             precond_range=lstm.precond_range)
            else:
                self.update_net = CoordinateUpdateLSTM(lstm.coord_hidden, preprocess_p=lstm.preprocess_p,
                                                       update_scale=lstm.update_scale, update_clamp=lstm.update_clamp,
                                                       update_param=lstm.update_param, precond_lr=lstm.precond_lr,
                                                       precond_range=lstm.precond_range)
        self.tele_nets: nn.ModuleList | None = None
        self.neuronwise = self.learn_tele and lstm.tele_arch == "neuronwise"
        if self.neuronwise:
            net = NeuronwiseTeleportLSTM(lstm.neuron_hidden, lstm.neuron_rank, magnitude=self.tele_cfg.magnitude,
                                         preprocess_p=lstm.preprocess_p, magnitude_mode=self.tele_cfg.magnitude_mode,
                                         lr=self.learn_lr, lr_min=lstm.lr_min, lr_max=lstm.lr_max,
                                         lr_param=lstm.lr_param, lr_init=lstm.lr_init)
            self.tele_nets = nn.ModuleList([net])
        elif self.learn_tele:
            nets = []
            for i in range(len(self.shapes) - 1):
                k = self.shapes[i][0]
                n_in = self.shapes[i][0] * self.shapes[i][1] + self.shapes[i + 1][0] * self.shapes[i + 1][1]
                tp = lstm.preprocess if lstm.tele_preprocess == "same" else lstm.tele_preprocess
                common = dict(magnitude=self.tele_cfg.magnitude, magnitude_mode=self.tele_cfg.magnitude_mode,
                              preprocess=tp,
                              preprocess_p=lstm.preprocess_p, input_scale=lstm.input_scale)
                if self.learn_lr:
                    nets.append(LrTeleportLSTM(n_in, k, lstm.lr_tele_hidden, lr_min=lstm.lr_min,
                                               lr_max=lstm.lr_max, lr_param=lstm.lr_param,
                                               lr_init=lstm.lr_init, **common))
                else:
                    nets.append(TeleportLSTM(n_in, k, lstm.tele_hidden, **common))
            self.tele_nets = nn.ModuleList(nets)

    # ------------------------------------------------------------------ description
    @property
    def tele_until(self) -> int:
        """Teleport only at inner steps ``t < tele_until`` (0: at every step): ``tele_cfg.until``."""
        return self.tele_cfg.until

    @tele_until.setter
    def tele_until(self, value: int) -> None:
        self.tele_cfg = dataclasses.replace(self.tele_cfg, until=int(value))

    @property
    def hidden_widths(self) -> list[int]:
        """Widths of the hidden layers ``[k_1, ..., k_{L-1}]`` of the network this module is built for."""
        return [o for o, _ in self.shapes[:-1]]

    @property
    def size_agnostic(self) -> bool:
        """True when no meta-parameter depends on the network's widths or depth: the update is the
        coordinatewise LSTM (or GD's) and the teleport, if any, is the neuronwise LSTM."""
        update_ok = self.update_net is None or isinstance(self.update_net, CoordinateUpdateLSTM)
        return update_ok and (not self.learn_tele or self.neuronwise)

    def fixed_size_parts(self) -> list[str]:
        """Names of the LSTMs that tie this method to its training widths (empty when size-agnostic)."""
        parts = []
        if self.update_net is not None and not isinstance(self.update_net, CoordinateUpdateLSTM):
            parts.append('update LSTM (lstm.update_arch = "full")')
        if self.learn_tele and not self.neuronwise:
            parts.append('teleport LSTM (lstm.tele_arch = "full")')
        return parts

    def resized(self, shapes: Sequence[tuple[int, int]]) -> "LearnedMethod":
        """The same trained meta-optimiser for a network with weights of ``shapes`` (any widths, any number
        of hidden layers); ``self`` if the shapes are its own. Raises ``ValueError`` naming the fixed-size
        LSTM when the method is not :attr:`size_agnostic`."""
        shapes = [tuple(int(x) for x in s) for s in shapes]
        if shapes == self.shapes:
            return self
        if not self.size_agnostic:
            raise ValueError(f"{self.name} has a fixed-size {' and '.join(self.fixed_size_parts())}: it works "
                             f"only for weight shapes {self.shapes}, not {shapes}")
        p = next(self.parameters())
        new = LearnedMethod(self.name, shapes, self.lstm_cfg, self.tele_cfg).to(dtype=p.dtype, device=p.device)
        new.load_state_dict(self.state_dict())
        return new.train(self.training)

    def arch(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this module."""
        return {"method": self.name, "shapes": [list(s) for s in self.shapes],
                "update_arch": self.lstm_cfg.update_arch if self.learn_update else None,
                "param_shapes": {k: list(v.shape) for k, v in self.state_dict().items()}}

    def defer_weight_grads(self, enabled: bool = True, matmul_dtype: torch.dtype | None = None) -> "LearnedMethod":
        """Form the LSTM weights' gradients once per backward pass (:mod:`metatele.learned.deferred`):
        the meta-trainer's ``meta_loss.backward()`` gets the same gradients faster. Off by default, since
        ``torch.autograd.grad`` with the weights as inputs would then not see them. ``matmul_dtype`` (e.g.
        ``torch.bfloat16``, with ``enabled``): the LSTMs' matrix products in that precision (mixed precision,
        ``meta.matmul_dtype``); None keeps the weights' dtype. Without a graph (evaluation) nothing changes."""
        for m in self.modules():
            if isinstance(m, StackedLSTM):
                m.defer_weight_grad = bool(enabled)
                m.matmul_dtype = matmul_dtype if enabled else None
        return self

    # ------------------------------------------------------------------ state
    def init_state(self, batch: int, dtype=None, device=None) -> dict[str, Any]:
        st: dict[str, Any] = {"update": None, "tele": None,
                              "lr": torch.full((batch,), self.lstm_cfg.lr_init, dtype=dtype, device=device)}
        if self.update_net is not None:
            if isinstance(self.update_net, CoordinateUpdateLSTM):
                st["update"] = self.update_net.init_state(batch, dtype, device, n_params=self.n_params)
            else:
                st["update"] = self.update_net.init_state(batch, dtype, device)
        if self.neuronwise:
            st["tele"] = [self.tele_nets[0].init_state(batch, dtype, device, n_neurons=sum(self.hidden_widths))]
        elif self.tele_nets is not None:
            st["tele"] = [net.init_state(batch, dtype, device) for net in self.tele_nets]
        return st

    @staticmethod
    def detach_state(state: dict[str, Any]) -> dict[str, Any]:
        return {"update": None if state["update"] is None else detach_state(state["update"]),
                "tele": None if state["tele"] is None else [detach_state(s) for s in state["tele"]],
                "lr": state["lr"].detach()}

    @staticmethod
    def select_state(state: dict[str, Any], keep: Tensor) -> dict[str, Any]:
        """The recurrent state of the trajectories ``keep`` (indices into the batch ``B``); rows of a
        coordinatewise LSTM state (``B * P``) are selected trajectory by trajectory."""
        B = state["lr"].shape[0]

        def rows(x: Tensor) -> Tensor:
            if x.shape[0] == B:
                return x.index_select(0, keep)
            return x.reshape(B, -1, x.shape[-1]).index_select(0, keep).reshape(-1, x.shape[-1])

        def lstm(st):
            return tuple((rows(h), rows(c)) for h, c in st)

        return {"update": None if state["update"] is None else lstm(state["update"]),
                "tele": None if state["tele"] is None else [lstm(s) for s in state["tele"]],
                "lr": state["lr"].index_select(0, keep)}

    @staticmethod
    def replace_state(state: dict[str, Any], rows: Tensor, fresh: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the trajectories ``rows`` (indices into the batch ``B``) taken from ``fresh`` (a state
        of ``len(rows)`` trajectories, e.g. :meth:`init_state`), the others kept; out of place. Rows of a
        coordinatewise LSTM state (``B * P``) are replaced trajectory by trajectory."""
        B, n = state["lr"].shape[0], len(rows)

        def put(x: Tensor, y: Tensor) -> Tensor:
            if x.shape[0] == B:
                return x.index_copy(0, rows, y.to(x.dtype))
            return x.reshape(B, -1, x.shape[-1]).index_copy(0, rows, y.reshape(n, -1, y.shape[-1]).to(x.dtype)
                                                            ).reshape(-1, x.shape[-1])

        def lstm(st, new):
            return tuple((put(h, h2), put(c, c2)) for (h, c), (h2, c2) in zip(st, new))

        return {"update": None if state["update"] is None else lstm(state["update"], fresh["update"]),
                "tele": None if state["tele"] is None else [lstm(a, b) for a, b in zip(state["tele"], fresh["tele"])],
                "lr": put(state["lr"], fresh["lr"])}

    # ------------------------------------------------------------------ the step pieces
    def propose_update(self, weights: Sequence[Tensor], grads: Sequence[Tensor],
                       state: dict[str, Any], grad_rows: Tensor | None = None
                       ) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
        """One local update: ``w - UpdateLSTM(grad)`` or ``w - lr_t grad``. Shapes ``W_i (B, out, in)``.
        ``grad_rows``: the trajectories whose ``grads`` carry a graph the meta-gradient needs, the others'
        being constants (None: all); it only saves work in the meta-gradient."""
        state = dict(state)
        if self.update_net is not None:
            g = flatten(grads, 1)
            u, state["update"] = self.update_net(g.to(next(self.update_net.parameters()).dtype), state["update"],
                                                 grad_rows)
            new = flatten(weights, 1) - u.to(g.dtype)
            return unflatten(new, weights, 1), state
        lr = state["lr"].to(weights[0].dtype)
        return tuple(w - lr.reshape((-1,) + (1,) * (w.dim() - 1)) * g for w, g in zip(weights, grads)), state

    def propose_teleport(self, grads: Sequence[Tensor], state: dict[str, Any]
                         ) -> tuple[list[Tensor] | None, dict[str, Any]]:
        """``T`` per hidden layer from the teleport LSTMs (and ``lr_{t+1}``, mean over layers as in P2)."""
        if self.tele_nets is None:
            return None, state
        state = dict(state)
        if self.neuronwise:
            net = self.tele_nets[0]
            Ts, lr, s = net([g.to(net.head.weight.dtype) for g in grads], state["tele"][0])
            state["tele"] = [s]
            if lr is not None:
                state["lr"] = lr
            return Ts, state
        Ts, new_states, lrs = [], [], []
        for i, net in enumerate(self.tele_nets):
            x = pair_gradients(grads, i).to(next(net.parameters()).dtype)
            if self.learn_lr:
                T, lr, s = net(x, state["tele"][i])
                lrs.append(lr)
            else:
                T, s = net(x, state["tele"][i])
            Ts.append(T)
            new_states.append(s)
        state["tele"] = new_states
        if lrs:
            state["lr"] = torch.stack(lrs).mean(0)
        return Ts, state

    def teleport_scale(self, t: int) -> float:
        """The teleport schedule: the factor on the teleport LSTMs' ``T`` at inner step ``t``, 0 where the
        method does not teleport (no teleport LSTM, ``t % every != 0``, or ``t >= tele_until > 0``);
        otherwise ``first_magnitude / magnitude`` at ``t = 0`` (``teleport.first_magnitude``), times
        ``(until - t) / (taper + 1)`` over the last ``taper`` steps before ``tele_until``
        (``teleport.taper``), else 1."""
        c = self.tele_cfg
        if not self.learn_tele or t % c.every or (self.tele_until > 0 and t >= self.tele_until):
            return 0.0
        scale = c.first_magnitude / c.magnitude if t == 0 and c.first_magnitude > 0 and c.magnitude > 0 else 1.0
        if c.taper > 0 and self.tele_until > 0 and t >= self.tele_until - c.taper:
            scale *= (self.tele_until - t) / (c.taper + 1)
        return scale

    def teleport_scales(self, phase: Tensor) -> "Tensor | float":
        """:meth:`teleport_scale` of trajectories at different inner steps ``phase (B,)``: a ``(B,)`` float64
        tensor, or ``0.0`` when none of them teleports (the step then runs no teleport at all)."""
        scales = [self.teleport_scale(int(t)) for t in phase.tolist()]
        if not any(scales):
            return 0.0
        return torch.tensor(scales, dtype=torch.float64, device=phase.device)

    def teleport(self, weights: Sequence[Tensor], X: Tensor, Ts: Sequence[Tensor],
                 X_pinv: Tensor | None = None) -> tuple[Tensor, ...]:
        """Apply the group elements from ``Ts`` with the configured action (exact by default)."""
        c = self.tele_cfg
        Ts = [T.to(weights[0].dtype) for T in Ts]
        return apply_learned_teleport(weights, X, Ts, action=c.action, param=c.param,
                                      compute_dtype=c.compute_dtype, X_pinv=X_pinv)
