"""Truncated-BPTT meta-training of one learned method (P2 section 6).

The four separate things (as in google/learned_optimization): the inner task
(:mod:`metatele.problems`, seeded regression trajectories), the learned optimiser
(:class:`~metatele.learned.LearnedMethod`), the meta-gradient estimator (:func:`~metatele.meta.unroll.run_window`
through the ``higher`` adapter) and this outer loop.

What enters the meta-loss and where the graph is cut
----------------------------------------------------
A meta-batch is ``B = methods.<name>.batch`` (else ``train.batch``) trajectories (one batch dimension, one call per step) of
``methods.<name>.steps`` inner steps, split into windows of ``meta.unroll`` = K steps (the last may be
shorter). For each window starting at ``w_{t0}`` (a detached leaf):

1. unroll K inner steps; meta-loss = ``sum_{j=1..K} decay^(K-j) f(L(w_{t0+j}))`` averaged over the
   trajectories (``f``: identity = P2's sum of inner losses, or ``log``, or ratio; ``meta.meta_loss``);
   if an inner loss becomes non-finite the window stops there and keeps the finite terms before it;
2. ``meta_loss.backward()`` (no ``retain_graph``: the window's graph is freed);
3. ``grad_hook(params)`` (e.g. an all-reduce averaging the meta-gradients across processes);
4. if the meta-loss or any meta-gradient is not finite: the update is skipped and counted;
   otherwise optional clipping (``meta.grad_clip``) and one Adam step;
5. the weights and LSTM states are detached (the graph is cut) and the next window starts.

If the inner weights themselves become non-finite, the rest of the meta-batch is abandoned (counted as
``diverged``). Meta-batch ``i`` uses the training seeds with indices ``seed_offset + i B ... + B - 1``
(``B``, the *global* meta-batch); in a world of ``n`` data-parallel processes rank ``r``
unrolls the contiguous share ``[r B // n, (r + 1) B // n)`` of them (:meth:`MetaTrainer.seeds_for`,
:mod:`metatele.meta.distributed`), so a run is a pure function of (configuration, global step) whatever the
number of processes, which is what makes resuming exact, also on another number of processes.
Distributed runs set ``grad_hook`` (meta-gradient all-reduce) and ``window_hook`` (collective meta-loss
and divergence decision, so that every rank leaves a meta-batch at the same window).

Staggered truncations (``train.stagger``, per method ``methods.<name>.stagger``)
-----------------------------------------
Above, the ``B`` trajectories of a meta-batch are in lockstep: ``H / K`` consecutive meta-updates each see
one part of the horizon only (the first window once per meta-batch), which at large ``B`` leaves few
meta-updates for each part and a meta-gradient that swings from one part to the next. With ``stagger``
the ``B`` trajectories are a :class:`Population` kept across meta-batches, at different inner steps:
trajectory ``b``'s first life ends after ``K (1 + b mod H/K)`` steps, later ones after ``H``, and a
trajectory that ends (or diverges) is replaced by a new initialisation (the next seeds of the training
stream) at the window boundary. A meta-batch is still ``H / K`` windows of ``B`` trajectories (the same
meta-updates and trajectory-steps), and the population is saved in every checkpoint so that resuming is
exact.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..checkpoint import check_arch, library_versions, load_checkpoint, save_checkpoint, CheckpointMismatch
from ..config import Config, config_to_dict
from ..devices import resolve_device, shard
from ..learned.deferred import reuse_casts
from ..learned.loading import DTYPES, build_method, checkpoint_config
from ..learned.methods import LearnedMethod
from ..problems import regression_batch, train_seeds
from .unroll import STEPPERS, InnerState, rollout, run_window, start

__all__ = ["Progress", "Population", "MetaTrainer", "meta_param_groups", "meta_optimizer", "grads_finite", "selection_score"]

#: Index of the first training-stream seed of the selection problems (train.select_every), past any meta-batch.
SELECT_OFFSET = 10**7


@dataclass
class Progress:
    """Counters of a meta-training run (all saved in checkpoints)."""

    meta_batch: int = 0      # completed meta-batches (the global step)
    trajectories: int = 0    # trajectories completed (all processes together; staggered: lives ended)
    windows: int = 0         # truncation windows run (meta-updates attempted)
    updates: int = 0         # meta-updates applied
    skipped: int = 0         # meta-updates skipped: non-finite meta-loss or meta-gradient
    diverged: int = 0        # meta-batches abandoned because the inner weights went non-finite
    dropped: int = 0         # trajectories left out of the rest of their meta-batch (diverged alone;
                             # staggered: replaced by new ones)
    wall: float = 0.0        # seconds spent in meta-batches
    history: list[float] = field(default_factory=list)  # mean meta-loss per step, per meta-batch


@dataclass
class Population:
    """The trajectories of staggered meta-training (``train.stagger``), kept across meta-batches.

    state: their inner state, ``state.phase (B,)`` each one's inner step; life: ``(B,)`` long, the step at
    which each one ends (the first lives are staggered, then the horizon); next_seed: index into the
    training seed stream (:func:`metatele.problems.train_seeds`) of the next new trajectory."""

    state: InnerState
    life: torch.Tensor
    next_seed: int


def _map_tensors(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a nest of tuples, lists and dicts (e.g. an LSTM state)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def matmul_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype of ``meta.matmul_dtype = name`` on ``device`` (None: the weights' own). Where the device has
    no fast bfloat16 products (a CPU without AVX-512, a GPU without bfloat16), float32 is kept, with a
    warning: there bfloat16 would be slower, not faster."""
    if name == "same":
        return None
    dtype = getattr(torch, name)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        fast = bool(check()) if check is not None else True
    else:
        fast = True
    if not fast:
        warnings.warn(f"meta.matmul_dtype = {name!r}: this {device.type} has no fast {name} matrix products; "
                      "meta-training keeps float32 products", stacklevel=3)
        return None
    return dtype


def meta_param_groups(method: LearnedMethod, *, lr_update: float, lr_teleport: float,
                      lr_lr_teleport: float) -> list[dict]:
    """Adam parameter groups of a learned method (P2 section 6): the update LSTM at ``lr_update``, the
    teleport LSTMs at ``lr_teleport`` (``lr_lr_teleport`` for LSTM(lr,tele)'s LrTeleportLSTMs)."""
    groups = []
    if method.update_net is not None:
        groups.append({"params": list(method.update_net.parameters()), "lr": lr_update, "name": "update"})
    if method.tele_nets is not None:
        lr = lr_lr_teleport if method.learn_lr else lr_teleport
        groups.append({"params": list(method.tele_nets.parameters()), "lr": lr, "name": "teleport"})
    return groups


def meta_optimizer(groups: list[dict]) -> torch.optim.Adam:
    """The outer Adam over the meta-parameter groups (P2: Adam). Fused (one kernel over all 4.4M
    meta-parameters of the paper-size LSTMs instead of several passes per tensor) where this build of
    torch offers it for the parameters' device; the same update up to rounding."""
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(groups)


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """True if every gradient is finite, from one fused 2-norm per tensor (a NaN or inf entry makes it
    non-finite; so does a norm that overflows the dtype, ~1e19 per entry in float32, which no useful
    meta-update has) and one host synchronisation in all: ~20x faster than ``isfinite(g).all()``."""
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def selection_score(L: torch.Tensor, horizon: int, spike_factor: float = 10.0) -> float:
    """``L (problems, steps)``: mean over problems of the mean ``log L_t`` over the training horizon
    ``t < horizon`` (what meta-training optimises), plus ``log 1e21`` times the fraction of problems whose
    loss, at any of the steps (also beyond the horizon), is non-finite or above ``spike_factor`` times its
    running minimum: stability beyond the horizon is required, not traded against speed."""
    L = L.detach().double().cpu()
    finite = torch.isfinite(L)
    Lf = torch.where(finite, L.clamp_min(1e-30), torch.full_like(L, 1e21))
    run_min = torch.cummin(Lf, dim=1).values
    unstable = (~finite.all(1)) | (Lf[:, 1:] > spike_factor * run_min[:, :-1]).any(1)
    return float(Lf[:, :horizon].log().mean() + math.log(1e21) * unstable.double().mean())


class MetaTrainer:
    """Meta-trains ``method_name`` with configuration ``cfg``.

    rank, world_size: this process's place among data-parallel meta-trainers (seeds are split by them).
    grad_hook: called as ``grad_hook(list_of_meta_parameters)`` between ``backward()`` and the
      finiteness check and Adam step; the place for ``torch.distributed.all_reduce`` of ``p.grad``.
    window_hook: ``(meta_loss, inner weights diverged) -> (meta_loss, diverged)`` after each window, and
      stop_hook: ``int -> int``, passed to ``run_window`` as ``stop_sync``: the world-wide versions of the
      trainer's data-dependent decisions (:func:`metatele.meta.distributed.trainer_hooks`), so that every
      rank takes the branch one process would.
    device: overrides ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
    stepper: ``"higher"`` (default) or ``"autograd"`` (plain-tensor reference, same numbers).
    """

    def __init__(self, method_name: str, cfg: Config, *, rank: int = 0, world_size: int = 1,
                 grad_hook: Callable[[list[torch.nn.Parameter]], None] | None = None,
                 stepper: str = "higher", device: str | torch.device | None = None,
                 window_hook: Callable[[float, bool], tuple[float, bool]] | None = None,
                 stop_hook: Callable[[int], int] | None = None):
        if method_name not in cfg.methods:
            raise ValueError(f"method {method_name!r} has no [methods.{method_name}] counts; "
                             f"configured: {sorted(cfg.methods)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch = cfg.batch_of(method_name)  # global meta-batch: methods.<name>.batch or train.batch
        shard(self.batch, rank, world_size)  # clear error if world_size > the meta-batch
        if stepper not in ("higher", "autograd"):
            raise ValueError(f"stepper {stepper!r}; allowed: ['higher', 'autograd']")
        self.name, self.cfg = method_name, cfg
        self.rank, self.world_size = rank, world_size
        self.grad_hook = grad_hook
        self.window_hook = window_hook
        self.stop_hook = stop_hook
        self.stepper_kind = stepper
        self.device = resolve_device(cfg.train.device if device is None else device)
        self.dtype = DTYPES[cfg.problem.dtype]
        low = matmul_dtype(cfg.matmul_dtype_of(method_name), self.device)
        self.method = build_method(method_name, cfg).to(self.device).defer_weight_grads(True, low)
        m = cfg.meta
        self.opt = meta_optimizer(meta_param_groups(self.method, lr_update=m.lr_update, lr_teleport=m.lr_teleport,
                                                    lr_lr_teleport=m.lr_lr_teleport))
        self.progress = Progress()
        self.counts = cfg.methods[method_name]
        self.best: dict[str, Any] | None = None  # selected meta-parameters (train.select_every)
        self.population: Population | None = None  # train.stagger: created by the first meta-batch
        self.stagger = cfg.stagger_of(method_name)
        self.through = cfg.through_teleport_of(method_name)
        if self.stagger:
            if world_size > 1 or window_hook is not None or stop_hook is not None:
                raise ValueError("train.stagger is single-process: set it to false for data-parallel runs")
            if self.counts.steps % m.unroll:
                raise ValueError(f"train.stagger needs the horizon methods.{method_name}.steps = {self.counts.steps} "
                                 f"to be a multiple of meta.unroll = {m.unroll}")
            if m.first_window_weight != 1.0:
                raise ValueError("train.stagger has no first window (the trajectories are at different steps): "
                                 "leave meta.first_window_weight at 1")

    # ------------------------------------------------------------------ schedule
    @property
    def n_meta_batches(self) -> int:
        return math.ceil(self.counts.trajectories / self.batch)

    def seeds_for(self, meta_batch: int) -> list[int]:
        """Training seeds of meta-batch ``meta_batch`` on this rank: its share of the ``train.batch`` seeds
        of the meta-batch (disjoint across ranks and steps; the union over ranks is one process's batch)."""
        B = self.batch
        lo, hi = shard(B, self.rank, self.world_size)
        first = self.cfg.train.seed_offset + meta_batch * B + lo
        return train_seeds(hi - lo, start=first)

    # ------------------------------------------------------------------ one meta-batch
    def _meta_update(self, meta_loss: torch.Tensor) -> bool:
        """Backward, hook, finiteness check, clip, Adam step. Returns True if the update was applied."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self.opt.zero_grad(set_to_none=True)
        self.progress.windows += 1
        if not torch.isfinite(meta_loss):
            if self.grad_hook is not None:  # other ranks wait in the hook's all-reduce: join it with NaN
                for p in params:            # gradients, so that every rank skips this update
                    p.grad = torch.full_like(p, float("nan"))
                self.grad_hook(params)
                self.opt.zero_grad(set_to_none=True)
            self.progress.skipped += 1
            return False
        meta_loss.backward()
        if self.grad_hook is not None:
            self.grad_hook(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads_finite(grads):
            self.opt.zero_grad(set_to_none=True)
            self.progress.skipped += 1
            return False
        if self.cfg.meta.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.meta.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.progress.updates += 1
        return True

    def _start(self, seeds: list[int]) -> InnerState:
        """Inner state of new trajectories on the training problems ``seeds``."""
        prob = regression_batch(self.cfg.problem.dims, seeds, dtype=self.dtype, device=self.device)
        return start(self.method, prob.weights, prob.X, prob.Y)

    def _window(self, s: InnerState, k: int, stepper) -> tuple[InnerState, torch.Tensor, torch.Tensor]:
        """One truncation window of ``k`` inner steps with this trainer's meta-loss settings."""
        m = self.cfg.meta
        with reuse_casts():  # the meta-parameters are fixed during the window's forward pass
            return run_window(self.method, s, k, stepper, kind=m.meta_loss, decay=m.decay,
                              stop_sync=self.stop_hook, through_teleport=self.through)

    def _end_meta_batch(self, i: int, metas: list[float], t_begin: float) -> float:
        """Bookkeeping after meta-batch ``i``: progress, the selection check, the mean meta-loss (returned)."""
        self.progress.meta_batch = i + 1
        self._maybe_select(i)
        self.progress.wall += time.perf_counter() - t_begin
        mean = sum(metas) / len(metas) if metas else float("nan")
        self.progress.history.append(mean)
        return mean

    def _new_population(self) -> Population:
        """``B`` trajectories at step 0 whose first lives end after ``K, 2K, ..., H, K, 2K, ...`` steps."""
        B, H, K = self.batch, self.counts.steps, self.cfg.meta.unroll
        first = self.cfg.train.seed_offset
        s = self._start(train_seeds(B, start=first))
        s = dataclasses.replace(s, phase=torch.zeros(B, dtype=torch.long, device=self.device))
        life = K * (1 + torch.arange(B, device=self.device) % (H // K))
        return Population(s, life, first + B)

    def _run_staggered(self, i: int, on_window: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """One staggered meta-batch: ``H / K`` windows of the population (module docstring)."""
        if self.population is None:
            self.population = self._new_population()
        pop = self.population
        H, K = self.counts.steps, self.cfg.meta.unroll
        stepper = STEPPERS[self.stepper_kind](len(pop.state.weights), first_order=self.cfg.meta.first_order)
        s = pop.state
        t_begin = time.perf_counter()
        metas, started = [], []
        for _ in range(H // K):
            s, meta, rec = self._window(s, K, stepper)
            m = float(meta.detach()) / K
            applied = self._meta_update(meta)
            s = s.cut()
            rows_bad = s.diverged_rows()
            done = rows_bad | (s.phase >= pop.life)
            if bool(done.any()):
                rows = done.nonzero().squeeze(1)
                seeds = train_seeds(len(rows), start=pop.next_seed)
                pop.next_seed += len(rows)
                s = s.replace(rows, self._start(seeds))
                pop.life = pop.life.index_fill(0, rows, H)
                self.progress.dropped += int(rows_bad.sum())
                self.progress.trajectories += int((done & ~rows_bad).sum())
                started += seeds
            if math.isfinite(m):
                metas.append(m)
            if on_window is not None:
                on_window({"meta_batch": i, "t": s.t, "meta_loss": m, "applied": applied,
                           "inner_loss": float(rec[-1].mean())})
        pop.state = s
        mean = self._end_meta_batch(i, metas, t_begin)
        return {"meta_batch": i, "meta_loss": mean, "diverged": False, "seeds": started}

    def _maybe_select(self, i: int) -> None:
        """The selection check (``train.select_every``) after meta-batch ``i``, where it is due."""
        every = self.cfg.train.select_every
        if every and ((i + 1) % every == 0 or i + 1 == self.n_meta_batches):
            score = self.selection_score()
            if self.best is None or score < self.best["score"]:
                self.best = {"meta_params": copy.deepcopy(self.method.state_dict()), "score": score,
                             "meta_batch": i + 1}

    def run_meta_batch(self, meta_batch: int | None = None,
                       on_window: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Meta-train on one meta-batch of trajectories (default: the next one) and advance progress."""
        i = self.progress.meta_batch if meta_batch is None else meta_batch
        if self.stagger:
            return self._run_staggered(i, on_window)
        seeds = self.seeds_for(i)
        s = self._start(seeds)
        stepper = STEPPERS[self.stepper_kind](len(s.weights), first_order=self.cfg.meta.first_order)
        steps, K = self.counts.steps, self.cfg.meta.unroll
        t_begin = time.perf_counter()
        metas, diverged = [], False
        while s.t < steps:
            k = min(K, steps - s.t)
            first_window = s.t == 0
            s, meta, rec = self._window(s, k, stepper)
            m = float(meta.detach()) / k  # logged unweighted
            if first_window and self.cfg.meta.first_window_weight != 1.0:
                meta = meta * self.cfg.meta.first_window_weight
            applied = self._meta_update(meta)
            s = s.cut()
            rows_bad = s.diverged_rows()
            bad = bool(rows_bad.any())
            if self.window_hook is not None:  # world-wide meta-loss; stop on every rank if one diverged
                m, bad = self.window_hook(m, bad)
            elif bad and self.cfg.train.drop_diverged and not bool(rows_bad.all()):
                # go on with the trajectories that are still finite (one diverged initialisation does
                # not cost the other B - 1 the rest of their meta-batch)
                self.progress.dropped += int(rows_bad.sum())
                s = s.select((~rows_bad).nonzero().squeeze(1))
                bad = False
            if math.isfinite(m):
                metas.append(m)
            info = {"meta_batch": i, "t": s.t, "meta_loss": m, "applied": applied,
                    "inner_loss": float(rec[-1].mean())}
            if on_window is not None:
                on_window(info)
            if bad:
                diverged = True
                break
        self.progress.trajectories += self.batch  # global: the whole world's meta-batch
        self.progress.diverged += int(diverged)
        mean = self._end_meta_batch(i, metas, t_begin)
        return {"meta_batch": i, "meta_loss": mean, "diverged": diverged, "seeds": seeds}

    def selection_seeds(self) -> list[int]:
        """Held-out problems of the selection check: training-stream seeds far beyond any meta-batch's."""
        return train_seeds(self.cfg.train.select_trajectories, start=self.cfg.train.seed_offset + SELECT_OFFSET)

    def selection_score(self) -> float:
        """Score of the current meta-parameters on the held-out problems (lower is better), run under
        ``torch.no_grad`` for ``select_horizon x steps`` steps: :func:`selection_score` of the losses."""
        prob = regression_batch(self.cfg.problem.dims, self.selection_seeds(), dtype=self.dtype, device=self.device)
        H = max(1, int(round(self.cfg.train.select_horizon * self.counts.steps)))
        L = rollout(self.method, prob.weights, prob.X, prob.Y, H)["loss"]
        return selection_score(L, self.counts.steps)

    # ------------------------------------------------------------------ checkpoints
    def payload(self) -> dict[str, Any]:
        """Everything needed to continue exactly (deep copies, safe to keep while training goes on)."""
        return {
            "method": self.name,
            "arch": self.method.arch(),
            "dims": list(self.cfg.problem.dims),
            "config": config_to_dict(self.cfg),
            "meta_params": copy.deepcopy(self.method.state_dict()),
            "meta_optim": copy.deepcopy(self.opt.state_dict()),
            "best": copy.deepcopy(self.best),
            "progress": asdict(copy.deepcopy(self.progress)),
            "population": self._population_payload(),
            "distributed": {"rank": self.rank, "world_size": self.world_size},
            "rng": torch.get_rng_state(),
            "versions": library_versions(),
        }

    def _population_payload(self) -> dict[str, Any] | None:
        pop = self.population
        if pop is None:
            return None
        st = pop.state
        copy_ = lambda x: x.detach().clone()  # noqa: E731
        return {"weights": [copy_(w) for w in st.weights], "X": copy_(st.X), "Y": copy_(st.Y),
                "lstm": _map_tensors(LearnedMethod.detach_state(st.lstm), copy_), "phase": copy_(st.phase),
                "t": int(st.t), "life": copy_(pop.life), "next_seed": int(pop.next_seed)}

    def _load_population(self, d: dict[str, Any] | None) -> None:
        if d is None:
            self.population = None
            return
        dev = lambda x: x.to(self.device)  # noqa: E731
        s = start(self.method, [dev(w) for w in d["weights"]], dev(d["X"]), dev(d["Y"]))
        s = dataclasses.replace(s, lstm=_map_tensors(d["lstm"], dev), phase=dev(d["phase"]), t=int(d["t"]))
        self.population = Population(s, dev(d["life"]), int(d["next_seed"]))

    def save(self, path, payload: dict[str, Any] | None = None):
        """Write the checkpoint (rank 0 only; other ranks hold the same state and return None)."""
        if self.rank != 0:
            return None
        return save_checkpoint(path, self.payload() if payload is None else payload)

    def load_payload(self, ck: dict[str, Any], path: str = "checkpoint") -> None:
        check_arch(ck, self.method.arch(), path)
        try:
            self.method.load_state_dict(ck["meta_params"])
            if ck.get("meta_optim") is not None:
                self.opt.load_state_dict(ck["meta_optim"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointMismatch(f"{path} does not fit this meta-optimiser: "
                                     f"{str(e).splitlines()[0][:150]}") from None
        self.progress = Progress(**ck["progress"])
        self.best = copy.deepcopy(ck.get("best"))
        self._load_population(ck.get("population"))

    @classmethod
    def resume(cls, path, *, trajectories: int | None = None, **kwargs) -> "MetaTrainer":
        """Rebuild a trainer from a checkpoint (a path or a loaded checkpoint dict; its own configuration),
        optionally with more trajectories; ``kwargs`` go to the constructor."""
        ck = path if isinstance(path, dict) else load_checkpoint(path)
        path = "checkpoint" if isinstance(path, dict) else path
        cfg = checkpoint_config(ck, path)
        if trajectories is not None:
            cfg.methods[ck["method"]].trajectories = int(trajectories)
            cfg.validate()
        tr = cls(ck["method"], cfg, **kwargs)
        tr.load_payload(ck, str(path))
        return tr
