"""Teleportation inside any ``torch.optim`` optimiser (P2 section 6 / Fig. 5; docs/experiments.md, section 1).

:class:`TeleportingOptimizer` wraps an optimiser that trains an ``nn.Sequential`` of ``nn.Linear`` and
``nn.LeakyReLU`` layers. Its :meth:`~TeleportingOptimizer.step` is the wrapped optimiser's ``step``, nothing
else, so with no teleport scheduled training is bit-identical to the bare optimiser. Before each minibatch the
training loop calls :meth:`~TeleportingOptimizer.start_batch`; when the :class:`TeleportSchedule` says so, the
model is teleported in place (:func:`metatele.teleport.teleport`) on a fresh *teleport batch* drawn from its own
stream (by default a :class:`metatele.data.TeleportBatches` over the training split, independent of the
training minibatches), and the optimiser's state is then handled by the *state policy*:

``reset`` (P2's behaviour: the public code rebuilds the optimiser after every teleport)
    All per-parameter state is dropped (momentum buffers, AdaGrad sums, Adam moments *and* step counters), which
    is exactly what rebuilding the optimiser with the same hyper-parameters does. The current ``param_groups``
    (learning rates possibly changed by a scheduler) are kept.
``keep``
    The state is left untouched: buffers built at the old weights are applied at the new ones.
``transform``
    Per state key (see :data:`VELOCITY_KEYS`, :data:`STATISTIC_KEYS`):

    * *velocity-like* buffers, i.e. accumulated update directions -- SGD's and RMSProp's ``momentum_buffer``
      (the update is ``-lr * buf``) and Adam's / AdamW's ``exp_avg`` (through its update direction
      ``m_hat / (sqrt(v_hat) + eps)``, re-encoded with the kept second moment) -- are pushed forward by the
      Jacobian of the group action, ``v -> J_Phi(w) v`` with ``Phi(w) = g . w`` the map that the teleport
      applied (a Jacobian-vector product by autograd, in float64). This is the velocity of the transformed
      trajectory ``g . w(t)``: for heavy-ball momentum (``w'' = -gamma w' - grad L``) the buffer is
      ``-w'/lr``, a tangent vector. For the linear action ``U -> U g^{-1}, V -> g V`` it is simply
      ``m_U -> m_U g^{-1}``, ``m_V -> g m_V``. (A gradient, a covector, would instead transform with
      ``J^{-T}``; the two agree only for orthogonal ``g``. We treat momentum as a velocity because that is
      how it enters the update.) A non-finite result falls back to keeping the buffer.
    * *second-moment statistics* -- AdaGrad's ``sum``, RMSProp's ``square_avg`` and ``grad_avg``, Adam's
      ``exp_avg_sq`` and ``max_exp_avg_sq`` -- are per-coordinate (diagonal) preconditioners. A general
      ``g in GL_k`` mixes coordinates, and no diagonal statistic transforms exactly under it, so they are
      **kept** (documented fallback); step counters are kept too, so Adam's bias correction continues.
    * any other key (an optimiser we do not know) is **kept**; every teleport event lists which keys were
      transformed and which were kept.

    ``Phi`` is rebuilt from the teleport batch and the composed group element ``report.elements``; this equals
    the map the teleport applied step by step exactly when the action composes, i.e. when the batch is no
    larger than the widths (docs/mathematics.md, section 3.8). Otherwise it is a first-order approximation;
    each event records ``composition_error = ||Phi(w) - w_teleported|| / ||w_teleported||`` so the user can
    see which case applies.

P2's settings (P2 Fig. 5) are the documented defaults: :data:`P2_OPTIMIZERS` (learning-rate rules) and
:func:`p2_teleport_config` (schedule and teleport learning rate per optimiser).
"""
from __future__ import annotations

import collections
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .nets import from_sequential
from .symmetry.actions import transform
from .teleport import RULES, TeleportReport, teleport

__all__ = ["STATE_POLICIES", "VELOCITY_KEYS", "STATISTIC_KEYS", "P2_OPTIMIZERS", "TeleportSchedule",
           "TeleportSettings", "TeleportEvent", "TeleportingOptimizer", "make_optimizer",
           "p2_teleport_config", "pushforward"]

STATE_POLICIES = ("reset", "keep", "transform")

#: State keys holding accumulated update directions: pushed forward by the action's Jacobian.
VELOCITY_KEYS = ("momentum_buffer", "exp_avg")
#: State keys holding per-coordinate second-moment statistics: kept under ``transform`` (no exact rule).
STATISTIC_KEYS = ("sum", "square_avg", "grad_avg", "exp_avg_sq", "max_exp_avg_sq", "step")

#: P2's optimisers (``teleport_optimization.py``): ``name -> (class, lr multiplier of the base lr, kwargs)``.
#: Base lr 1e-2 (MNIST, FashionMNIST) or 2e-2 (CIFAR-10).
P2_OPTIMIZERS: dict[str, tuple[type, float, dict]] = {
    "sgd": (torch.optim.SGD, 1.0, {}),
    "adagrad": (torch.optim.Adagrad, 1.0, {}),
    "momentum": (torch.optim.SGD, 0.1, {"momentum": 0.9}),
    "rmsprop": (torch.optim.RMSprop, 0.01, {}),
    "adam": (torch.optim.Adam, 0.01, {}),
}

#: P2's teleport schedule per optimiser: ``name -> (epochs, teleport learning rate)``.
P2_TELEPORT: dict[str, tuple[tuple[int, ...], float]] = {
    "sgd": ((2,), 1e-4),
    "adagrad": ((2,), 1e-4),
    "momentum": ((0,), 5e-2),
    "rmsprop": ((0,), 5e-2),
    "adam": ((0,), 5e-2),
}


def make_optimizer(name: str, params: Iterable[Tensor], base_lr: float = 1e-2) -> torch.optim.Optimizer:
    """P2's optimiser ``name`` with its learning rule: AdaGrad and SGD at ``base_lr``, SGD with momentum 0.9 at
    ``base_lr / 10``, RMSProp and Adam at ``base_lr / 100`` (PyTorch defaults otherwise)."""
    if name not in P2_OPTIMIZERS:
        raise ValueError(f"unknown optimiser {name!r}; allowed: {sorted(P2_OPTIMIZERS)}")
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr must be a finite number > 0, got {base_lr}")
    cls, mult, kw = P2_OPTIMIZERS[name]
    return cls(params, lr=base_lr * mult, **kw)


@dataclass
class TeleportSchedule:
    """When to teleport, and the size of the teleport batch.

    A teleport happens before the minibatch ``batch_index`` of epoch ``epoch`` (both 0-based) if
    ``epoch in epochs`` and ``batch_index < per_epoch`` (P2: the first 8 minibatches of one epoch), or before
    the optimiser step number ``s`` (0-based count of ``step()`` calls) if ``s in steps``.
    Every teleport uses a fresh batch of ``batch_size`` training samples (P2: 200) from the wrapper's
    ``batches`` stream, never the training minibatch itself.
    """

    epochs: tuple[int, ...] = (0,)
    per_epoch: int = 8
    steps: tuple[int, ...] = ()
    batch_size: int = 200

    def __post_init__(self):
        self.epochs = tuple(int(e) for e in self.epochs)
        self.steps = tuple(int(s) for s in self.steps)
        if any(e < 0 for e in self.epochs) or any(s < 0 for s in self.steps):
            raise ValueError(f"epochs and steps must be >= 0, got epochs={self.epochs}, steps={self.steps}")
        if self.per_epoch < 0:
            raise ValueError(f"per_epoch must be >= 0, got {self.per_epoch}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def never(cls) -> "TeleportSchedule":
        """A schedule with no teleport at all."""
        return cls(epochs=(), per_epoch=0, steps=())

    def due(self, epoch: int, batch_index: int, step: int) -> bool:
        return (epoch in self.epochs and batch_index < self.per_epoch) or step in self.steps

    @property
    def empty(self) -> bool:
        return (not self.epochs or self.per_epoch == 0) and not self.steps


@dataclass
class TeleportSettings:
    """How to teleport (arguments of :func:`metatele.teleport.teleport`): gradient-norm ascent, 10 steps,
    cross-entropy, exact inverse-form action with ``g = I + T``.

    The step rule defaults to metatele's safe one (``rule=None``: normalised steps of length ``lr``, default 0.1,
    with backtracking; docs/mathematics.md, section 5); P2's raw rule and learning rates (P2 Fig. 5: 5e-2 for
    momentum, RMSProp, Adam; 1e-4 for SGD and AdaGrad) come from :func:`p2_teleport_config` (``rule="raw"``).
    ``max_step_norm``, ``loss_tol``, ``max_cond``: the guards of :func:`metatele.teleport.teleport_weights`
    (``None``: its defaults)."""

    objective: str = "grad_norm"
    maximize: bool = True
    loss: str = "ce"
    steps: int = 10
    lr: float | None = None
    cap: float | None = None
    action: str = "inverse"
    param: str = "I+T"
    objective_kwargs: dict | None = None
    rule: str | None = None
    max_step_norm: float | None = None
    loss_tol: float | None = None
    max_cond: float | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"teleport steps must be >= 0, got {self.steps}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"teleport lr must be a finite number >= 0, got {self.lr}")
        if self.rule is not None and self.rule not in RULES:
            raise ValueError(f"unknown teleport rule {self.rule!r}; allowed: {RULES}")

    def teleport_kwargs(self) -> dict:
        """The keyword arguments of :func:`metatele.teleport.teleport` these settings stand for."""
        kw = dict(objective=self.objective, loss=self.loss, steps=self.steps, lr=self.lr, maximize=self.maximize,
                  cap=self.cap, action=self.action, param=self.param, objective_kwargs=self.objective_kwargs,
                  rule=self.rule, max_step_norm=self.max_step_norm, loss_tol=self.loss_tol)
        if self.max_cond is not None:
            kw["max_cond"] = self.max_cond
        return kw


def p2_teleport_config(name: str, base_lr: float = 1e-2) -> tuple[TeleportSchedule, TeleportSettings]:
    """P2's schedule and settings for optimiser ``name`` (P2 Fig. 5): 8 teleports at the start of epoch 0
    (momentum, RMSProp, Adam; teleport lr 5e-2) or epoch 2 (SGD, AdaGrad; teleport lr 1e-4), 10 ascent steps
    on the squared gradient norm with P2's raw rule ``T = lr dS/dT`` (``rule="raw"``; metatele's guards stay on),
    each on a fresh batch of 200 training samples."""
    if name not in P2_TELEPORT:
        raise ValueError(f"unknown optimiser {name!r}; allowed: {sorted(P2_TELEPORT)}")
    epochs, lr = P2_TELEPORT[name]
    return TeleportSchedule(epochs=epochs, per_epoch=8, batch_size=200), TeleportSettings(lr=lr, rule="raw")


@dataclass
class TeleportEvent:
    """One teleport performed by :class:`TeleportingOptimizer` (plain numbers, JSON-friendly)."""

    epoch: int
    batch_index: int
    step: int
    loss_before: float
    loss_after: float
    objective_before: float
    objective_after: float
    steps_taken: int
    exactness: str
    policy: str
    seconds: float
    transformed_keys: list[str] = field(default_factory=list)
    kept_keys: list[str] = field(default_factory=list)
    composition_error: float | None = None
    rule: str = ""
    rejected: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def pushforward(weights: tuple[Tensor, ...], tangents: tuple[Tensor, ...], X: Tensor,
                elements: list[Tensor], *, action: str = "inverse", slope: float = 0.1,
                bias: bool = False) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(Phi(w), J_Phi(w) v)`` for ``Phi(w) = transform(w, X, elements)``: the image of a tangent vector
    (velocity) ``v`` under the group action, by a Jacobian-vector product.

    ``weights``, ``tangents``: ``W_i (out_i, in_i[+1])``; ``X (d_in, b)``; one element ``(k_i, k_i)`` per
    hidden layer. For ``action="linear"`` this is ``v_U -> v_U g^{-1}``, ``v_V -> g v_V``.
    """
    def phi(*w):
        return transform(w, X, elements, action=action, slope=slope, bias=bias, validate=False)

    out, jv = torch.autograd.functional.jvp(phi, tuple(weights), tuple(tangents))
    return tuple(o.detach() for o in out), tuple(t.detach() for t in jv)


class TeleportingOptimizer:
    """A ``torch.optim`` optimiser with scheduled teleports of the model it trains (see the module docstring).

    Parameters
    ----------
    model:
        ``nn.Sequential`` of ``nn.Linear`` and ``nn.LeakyReLU`` (biases allowed) whose parameters ``optimizer``
        trains; teleports overwrite its weights in place, so the optimiser keeps the same parameter tensors.
    optimizer:
        any ``torch.optim.Optimizer``.
    schedule, settings:
        :class:`TeleportSchedule` (default: never teleport) and :class:`TeleportSettings`.
    batches:
        a callable returning the next teleport batch ``(inputs (b, features), targets)``, e.g.
        ``metatele.data.TeleportBatches(train, schedule.batch_size, generator)``. Required when the schedule
        is not empty.
    state_policy:
        ``"reset"`` (default, P2), ``"keep"`` or ``"transform"``.
    generator:
        random directions of the sharpness / curvature objectives.

    Use ``start_batch(epoch, batch_index)`` before computing each minibatch's loss, then the usual
    ``zero_grad()``, ``backward()``, ``step()``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 schedule: TeleportSchedule | None = None, settings: TeleportSettings | None = None,
                 batches: Callable[[], tuple[Tensor, Tensor]] | None = None, state_policy: str = "reset",
                 generator: torch.Generator | None = None):
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"unknown state policy {state_policy!r}; allowed: {STATE_POLICIES}")
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule if schedule is not None else TeleportSchedule.never()
        self.settings = settings if settings is not None else TeleportSettings()
        if not self.schedule.empty:
            from_sequential(model)  # validates the architecture now, not at the first teleport
            if batches is None:
                raise ValueError("a teleport schedule needs `batches`, a callable returning teleport batches")
        self.batches = batches
        self.state_policy = state_policy
        self.generator = generator
        self.step_count = 0
        self.events: list[TeleportEvent] = []
        self.last_report: TeleportReport | None = None
        self.teleport_seconds = 0.0

    # --- the optimiser interface: pure delegation ------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """Exactly ``optimizer.step(closure)``; counts the steps for step-based schedules."""
        out = self.optimizer.step(closure)
        self.step_count += 1
        return out

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # --- teleportation -----------------------------------------------------------------------------------
    def start_batch(self, epoch: int, batch_index: int) -> TeleportEvent | None:
        """Teleport now if the schedule says so for this minibatch; returns the event or ``None``."""
        if self.schedule.empty or not self.schedule.due(epoch, batch_index, self.step_count):
            return None
        inputs, targets = self.batches()
        return self.teleport_now(inputs, targets, epoch=epoch, batch_index=batch_index)

    def teleport_now(self, inputs: Tensor, targets: Tensor, *, epoch: int = -1,
                     batch_index: int = -1) -> TeleportEvent:
        """Teleport the model on ``(inputs, targets)`` and apply the state policy."""
        s = self.settings
        t0 = time.perf_counter()
        W_before, slope, bias = from_sequential(self.model)
        if not all(bool(torch.isfinite(w).all()) for w in W_before):
            # a diverged run: there is no level set to move along; skip, leave the state alone, and say so
            nan = float("nan")
            ev = TeleportEvent(epoch, batch_index, self.step_count, nan, nan, nan, nan, 0,
                               "skipped: non-finite weights", self.state_policy, time.perf_counter() - t0)
            self.events.append(ev)
            return ev
        report = teleport(self.model, inputs, targets, generator=self.generator, **s.teleport_kwargs())
        transformed, kept, comp_err = self._apply_policy(W_before, inputs, report, slope, bias)
        seconds = time.perf_counter() - t0
        self.teleport_seconds += seconds
        self.last_report = report
        f = lambda t: float(t.double().mean())  # noqa: E731
        ev = TeleportEvent(epoch, batch_index, self.step_count, f(report.loss_before), f(report.loss_after),
                           f(report.objective_before), f(report.objective_after),
                           int(report.steps_taken.max()), report.exactness.verdict, self.state_policy, seconds,
                           transformed, kept, comp_err, report.rule, report.rejections())
        self.events.append(ev)
        return ev

    def _linears(self) -> list[nn.Linear]:
        return [m for m in self.model if isinstance(m, nn.Linear)]

    def _apply_policy(self, W_before, inputs: Tensor, report: TeleportReport, slope: float,
                      bias: bool) -> tuple[list[str], list[str], float | None]:
        opt = self.optimizer
        if self.state_policy == "reset":
            opt.state = collections.defaultdict(dict)
            return [], [], None
        keys = sorted({k for st in opt.state.values() for k in st})
        if self.state_policy == "keep":
            return [], keys, None
        # transform: push the velocity-like buffers forward with the Jacobian of the action (in float64)
        params = [(m.weight, m.bias if bias else None) for m in self._linears()]
        W64 = tuple(w.double() for w in W_before)
        X = inputs.reshape(inputs.shape[0], -1).double().T
        elements = [e.double() for e in report.elements]
        transformed, kept = [], []
        comp_err = None
        for key in keys:
            if key not in VELOCITY_KEYS:
                kept.append(key)
                continue
            encoded = self._encode(key, params)
            if encoded is None:
                kept.append(key)
                continue
            velocity, decode = encoded
            image, new = pushforward(W64, tuple(v.double() for v in velocity), X, elements,
                                     action=self.settings.action, slope=slope, bias=bias)
            if not all(bool(torch.isfinite(t).all()) for t in new):
                kept.append(key)
                continue
            if comp_err is None:
                W_after, _, _ = from_sequential(self.model)
                num = math.sqrt(sum(float((a - c.double()).pow(2).sum()) for a, c in zip(image, W_after)))
                den = math.sqrt(sum(float(c.double().pow(2).sum()) for c in W_after))
                comp_err = num / max(den, 1e-300)
            decode(new)
            transformed.append(key)
        return transformed, kept, comp_err

    def _group_of(self, p: Tensor) -> dict:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("parameter not handled by the wrapped optimiser")

    def _encode(self, key: str, params):
        """The velocity stored under ``key`` as weight-shaped tensors, and a function writing a new velocity
        back. ``momentum_buffer`` (SGD, RMSProp) is itself the velocity (the update is ``-lr * buf``).
        Adam's ``exp_avg`` is not: the update direction is ``m_hat / (sqrt(v_hat) + eps)``, so that direction
        is pushed forward and ``exp_avg`` re-encoded with the *kept* second moment and bias corrections
        (``m' = J(m_hat / d) * d * (1 - beta1^t)``, ``d = sqrt(v_hat) + eps``)."""
        opt = self.optimizer
        flat = []  # (tensor p, state buf, scale d or None, bias-correction factor)
        for w, b in params:
            for p in (w, b):
                if p is None:
                    continue
                st = opt.state.get(p, {})
                buf = st.get(key)
                if not isinstance(buf, Tensor):
                    return None
                if key == "exp_avg":
                    group = self._group_of(p)
                    beta1, beta2 = group["betas"]
                    step = float(st["step"])
                    v = st.get("max_exp_avg_sq") if group.get("amsgrad") else st.get("exp_avg_sq")
                    if not isinstance(v, Tensor) or step < 1:
                        return None
                    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
                    d = (v.double() / bc2).sqrt() + group["eps"]
                    flat.append((p, buf, d, bc1))
                else:
                    flat.append((p, buf, None, 1.0))
        it = iter(flat)
        velocity, layout = [], []
        for w, b in params:
            parts = [next(it)] + ([next(it)] if b is not None else [])
            vs = [(buf.double() / bc) / d if d is not None else buf.double() for _, buf, d, bc in parts]
            if b is not None:
                velocity.append(torch.cat([vs[0], vs[1].unsqueeze(-1)], -1))
            else:
                velocity.append(vs[0])
            layout.append(parts)

        def decode(new):
            with torch.no_grad():
                for parts, t in zip(layout, new):
                    pieces = [t[..., : parts[0][0].shape[-1]]] + ([t[..., -1]] if len(parts) > 1 else [])
                    for (_, buf, d, bc), piece in zip(parts, pieces):
                        val = piece * d * bc if d is not None else piece
                        buf.copy_(val.to(buf.dtype))
        return velocity, decode
