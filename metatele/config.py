"""Configuration of the learning-to-teleport experiments (docs/meta_learning.md, section 5; docs/departures.md, section 8).

Every hyper-parameter of meta-training and evaluation lives in one of the dataclasses below, with the
paper's value (P2, Zhao et al. ICLR 2024, and its public code) as the documented default where the
paper has one. Configurations are TOML files in ``configs/`` read with :func:`load_config`; unknown keys
and out-of-range values raise ``ValueError`` naming the key, the value and the allowed range.

TOML layout (every table and key optional)::

    [problem]   dims, dtype
    [lstm]      architecture of the meta-optimisers
    [teleport]  how the learned group element is applied
    [meta]      truncated BPTT, meta-loss, meta-optimiser
    [train]     seed, batch, device, out, save_every
    [eval]      seeds, GD baselines
    [methods.lstm_update_tele] trajectories, steps, batch    (one table per method)
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "METHODS", "DTYPE_NAMES", "UPDATE_ARCHS", "TELE_ARCHS", "PREPROCESS", "UPDATE_PARAMS", "LR_PARAMS", "LEARNED_ACTIONS",
    "GROUP_PARAMS", "MAGNITUDE_MODES", "ORDERS", "COMPUTE_DTYPES", "META_LOSSES", "MATMUL_DTYPES", "ProblemConfig", "LSTMConfig", "TeleportConfig", "MetaConfig", "TrainConfig",
    "EvalConfig", "MethodConfig", "Config", "load_config", "config_from_dict", "config_to_dict",
    "PAPER_COUNTS",
]

#: Learned methods of P2's Figure 6.
METHODS = ("lstm_update_tele", "lstm_update", "lstm_lr_tele")

#: The allowed values of every choice setting, defined once: the configuration validates against them and
#: the modules that implement the choices import them from here.
DTYPE_NAMES = ("float32", "float64")
UPDATE_ARCHS = ("full", "coordinatewise")
TELE_ARCHS = ("full", "neuronwise")
PREPROCESS = ("none", "scale", "log_sign")
UPDATE_PARAMS = ("direct", "precond")
LR_PARAMS = ("clamp", "log_sigmoid")
LEARNED_ACTIONS = ("inverse", "linearised")
GROUP_PARAMS = ("I+T", "exp")
MAGNITUDE_MODES = ("fixed", "learned")
ORDERS = ("update_then_teleport", "teleport_then_update")
COMPUTE_DTYPES = ("float64", "same")
META_LOSSES = ("sum", "log", "mean_ratio")
MATMUL_DTYPES = ("same", "bfloat16")

#: Paper meta-training counts (trajectories, inner steps per trajectory), P2 section 6.
PAPER_COUNTS = {"lstm_lr_tele": (30, 300), "lstm_update_tele": (700, 100), "lstm_update": (600, 100)}


def _check_choice(where: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{where} = {value!r} is not allowed; choose one of {list(allowed)}")


def _check_range(where: str, value, lo=None, hi=None, *, lo_open=False, integer=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} = {value!r} must be a number")
    if integer and not isinstance(value, int):
        raise ValueError(f"{where} = {value!r} must be an integer")
    if not math.isfinite(value):
        raise ValueError(f"{where} = {value!r} must be finite")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ValueError(f"{where} = {value!r} is out of range; allowed {'(' if lo_open else '['}{lo_s}, {hi_s}]")


def _check_list(where: str, value) -> None:
    if not isinstance(value, list):
        hint = f", e.g. [{value!r}]" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise ValueError(f"{where} = {value!r} must be a list{hint}")


@dataclass
class ProblemConfig:
    """Regression problem family (docs/meta_learning.md, section 1).

    dims: ``[batch, d_in, hidden..., d_out]``; ``[20, 20, 20, 20]`` in P2 (X, Y, W_0, W_1 all 20 x 20).
    dtype: inner-loop precision, ``"float32"`` (paper) or ``"float64"``.
    """

    dims: list[int] = field(default_factory=lambda: [20, 20, 20, 20])
    dtype: str = "float32"

    def validate(self) -> None:
        if not isinstance(self.dims, list) or len(self.dims) < 4:
            raise ValueError(f"problem.dims = {self.dims!r} must be a list [batch, d_in, hidden..., d_out] "
                             "with at least one hidden layer (4 entries)")
        for i, d in enumerate(self.dims):
            _check_range(f"problem.dims[{i}]", d, 1, 100000, integer=True)
        _check_choice("problem.dtype", self.dtype, DTYPE_NAMES)


@dataclass
class LSTMConfig:
    """Architecture of the meta-optimisers (P2 section 6 / public ``lstm.py``).

    update_arch: ``"full"`` (P2: one LSTM reading the whole flattened gradient, 800 in, hidden 300,
      800 out) or ``"coordinatewise"`` (Andrychowicz et al. 2016: one small LSTM shared by every
      coordinate, works for any network size).
    update_hidden: hidden size of the full UpdateLSTM (P2: 300).
    coord_hidden: hidden size of the coordinatewise UpdateLSTM (Andrychowicz et al.: 20).
    tele_hidden: hidden size of the TeleportLSTM used with a learned update (P2: 300).
    lr_tele_hidden: hidden size of the LrTeleportLSTM (P2: 20).
    preprocess: gradient preprocessing before an LSTM: ``"none"`` (P2: raw gradients), ``"scale"``
      (divide by ``input_scale``) or ``"log_sign"`` (Andrychowicz et al. eq. in appendix A: per coordinate
      ``(log|g| / p, sign g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``; doubles the input width).
    tele_preprocess: preprocessing of the teleport LSTMs' input: ``"same"`` as ``preprocess`` (default) or
      one of its values.
    preprocess_p: the ``p`` of the log-sign preprocessing (Andrychowicz et al.: 10).
    input_scale: divisor of the ``"scale"`` preprocessing.
    update_param: ``"direct"`` (P2: the update is ``update_scale * head(h)``) or ``"precond"`` (the update
      is ``precond_lr * exp(precond_range * tanh(head(h))) * grad``: a learned per-coordinate positive step
      size, so the update vanishes with the gradient; starts as GD with ``precond_lr``).
    update_scale: the learned update is ``update_scale * head(h)`` (P2: 1).
    precond_lr, precond_range: base step and log-range of ``"precond"`` (factor within e^{+-range}).
    update_clamp: every update coordinate is clamped to ``[-update_clamp, update_clamp]`` (P2: 1e7).
    lr_min, lr_max: range of the learned step size (P2: [1e-7, 5e-3]).
    lr_param: ``"clamp"`` (P2: ``clamp(head(h), lr_min, lr_max)``; zero gradient outside the range) or
      ``"log_sigmoid"`` (``lr = lr_min (lr_max/lr_min)^sigmoid(head(h))``, smooth, starts at ``lr_init``).
    lr_init: step size of the first inner step (before the LSTM has spoken; P2's code: 1e-4) and, with
      ``lr_param = "log_sigmoid"``, the step size the untrained LSTM proposes.
    tele_arch: ``"full"`` (P2: one TeleportLSTM per hidden layer reading both whole gradient matrices
      around it; tied to the layer widths) or ``"neuronwise"`` (one small LSTM shared by every hidden
      neuron of every hidden layer, reading per-neuron gradient statistics; its outputs form a low-rank
      plus diagonal ``T`` per layer: any width, any depth; docs/meta_learning.md, section 3.1).
    neuron_hidden: hidden size of the neuronwise teleport LSTM.
    neuron_rank: rank ``r`` of the off-diagonal part ``A B^T`` of the neuronwise ``T``.
    """

    update_arch: str = "full"
    update_hidden: int = 300
    coord_hidden: int = 20
    tele_hidden: int = 300
    lr_tele_hidden: int = 20
    preprocess: str = "none"
    tele_preprocess: str = "same"
    preprocess_p: float = 10.0
    input_scale: float = 1.0
    update_param: str = "direct"
    update_scale: float = 1.0
    precond_lr: float = 3e-4
    precond_range: float = 3.0
    update_clamp: float = 1e7
    lr_min: float = 1e-7
    lr_max: float = 5e-3
    lr_param: str = "clamp"
    lr_init: float = 1e-4
    tele_arch: str = "full"
    neuron_hidden: int = 20
    neuron_rank: int = 2

    def validate(self) -> None:
        _check_choice("lstm.update_arch", self.update_arch, UPDATE_ARCHS)
        _check_choice("lstm.tele_arch", self.tele_arch, TELE_ARCHS)
        _check_range("lstm.neuron_rank", self.neuron_rank, 1, 1000, integer=True)
        for k in ("update_hidden", "coord_hidden", "tele_hidden", "lr_tele_hidden", "neuron_hidden"):
            _check_range(f"lstm.{k}", getattr(self, k), 1, 100000, integer=True)
        _check_choice("lstm.preprocess", self.preprocess, PREPROCESS)
        _check_choice("lstm.tele_preprocess", self.tele_preprocess, ("same",) + PREPROCESS)
        _check_range("lstm.preprocess_p", self.preprocess_p, 0, 100, lo_open=True)
        _check_range("lstm.input_scale", self.input_scale, 0, None, lo_open=True)
        _check_choice("lstm.update_param", self.update_param, UPDATE_PARAMS)
        _check_range("lstm.update_scale", self.update_scale, 0, None, lo_open=True)
        _check_range("lstm.precond_lr", self.precond_lr, 0, 1.0, lo_open=True)
        _check_range("lstm.precond_range", self.precond_range, 0, 20.0)
        _check_range("lstm.update_clamp", self.update_clamp, 0, None, lo_open=True)
        _check_range("lstm.lr_min", self.lr_min, 0, None, lo_open=True)
        _check_range("lstm.lr_max", self.lr_max, self.lr_min, None, lo_open=True)
        _check_choice("lstm.lr_param", self.lr_param, LR_PARAMS)
        _check_range("lstm.lr_init", self.lr_init, self.lr_min, self.lr_max)


@dataclass
class TeleportConfig:
    """How the TeleportLSTM's output becomes a teleport (docs/mathematics.md, section 3; docs/meta_learning.md, section 2).

    action: ``"inverse"`` (exact: ``U g^{-1}`` with a true inverse, ``V -> sigma^{-1}(g sigma(VX)) X^+``)
      or ``"linearised"`` (P2's learned teleport, ``U (I - T)``: first order only).
    param: group element from ``T``: ``"I+T"`` (P2) or ``"exp"`` (``exp(T)``); ignored by ``linearised``.
    magnitude: ``||T||_F`` after normalisation (P2: 0.01); with ``magnitude_mode = "learned"`` the largest
      ``||T||_F``.
    magnitude_mode: ``"fixed"`` (P2: every teleport has ``||T||_F = magnitude``) or ``"learned"`` (the
      teleport LSTM also outputs ``s`` in (0, 1) and ``||T||_F = s * magnitude``: it decides how far to go).
    order: ``"update_then_teleport"`` (P2: step t updates w_t with the gradient at w_t, then teleports
      the result with T computed from the same gradient) or ``"teleport_then_update"`` (teleport w_t with
      T computed from the gradient at w_t, then update with the gradient at the teleported point; one
      extra gradient per step).
    every: teleport at inner steps ``t`` with ``t % every == 0`` (P2: 1, every step).
    until: teleport only at inner steps ``t < until`` (0: at every step, P2).
    until_horizon: if true, ``until`` is each method's own training horizon (``methods.<name>.steps``): a
      trained meta-optimiser run for longer than it was trained for stops teleporting there instead of
      teleporting on in a regime it never saw (its teleports accumulate; with ``magnitude`` 0.05 they
      made most runs diverge by 3x the horizon).
    compute_dtype: precision of the group action (``"float64"`` keeps the loss to ~1e-8 relative in a
      float32 network whose X has condition number ~1e4; ``"same"`` uses the network's dtype).
    first_magnitude: ``||T||_F`` of the teleport at inner step 0 alone (0: ``magnitude``, P2); with
      ``magnitude_mode = "learned"`` its largest value. At most 0.99, so that ``I + T`` stays invertible.
    taper: over the last ``taper`` teleporting steps before ``until`` (or the horizon with
      ``until_horizon``), ``T`` shrinks linearly towards 0 (step ``t`` gets ``(until - t) / (taper + 1)``),
      so the teleports end gradually instead of at once (0: off, P2).
    """

    action: str = "inverse"
    param: str = "I+T"
    magnitude: float = 0.01
    magnitude_mode: str = "fixed"
    order: str = "update_then_teleport"
    every: int = 1
    until: int = 0
    until_horizon: bool = False
    compute_dtype: str = "float64"
    first_magnitude: float = 0.0
    taper: int = 0

    def validate(self) -> None:
        _check_choice("teleport.action", self.action, LEARNED_ACTIONS)
        _check_choice("teleport.param", self.param, GROUP_PARAMS)
        _check_range("teleport.magnitude", self.magnitude, 0, 1.0)
        _check_choice("teleport.magnitude_mode", self.magnitude_mode, MAGNITUDE_MODES)
        _check_choice("teleport.order", self.order, ORDERS)
        _check_range("teleport.every", self.every, 1, 10**9, integer=True)
        _check_range("teleport.until", self.until, 0, 10**9, integer=True)
        if not isinstance(self.until_horizon, bool):
            raise ValueError(f"teleport.until_horizon = {self.until_horizon!r} must be true or false")
        _check_choice("teleport.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_range("teleport.first_magnitude", self.first_magnitude, 0, 0.99)
        _check_range("teleport.taper", self.taper, 0, 10**9, integer=True)
        if self.taper > 0 and self.until == 0 and not self.until_horizon:
            raise ValueError(f"teleport.taper = {self.taper} needs an end to taper towards: set teleport.until "
                             f"or teleport.until_horizon = true")


@dataclass
class MetaConfig:
    """Truncated backpropagation through time (P2 section 6).

    unroll: inner steps per truncation window K (P2: 10); the graph is cut at every window boundary.
    meta_loss: ``"sum"`` (P2: sum of the inner losses L(w_t) of the window), ``"log"`` (sum of
      ``log L(w_t)``: every window and trajectory weighs the same whatever the loss scale) or
      ``"mean_ratio"`` (sum of ``L(w_t) / L(w_start)`` with ``L(w_start)`` the detached loss at the window
      start).
    decay: exponential weights within a window, step j of K gets ``decay^(K-1-j)`` (1 = P2's plain sum;
      < 1 weighs the latest steps most, Zamir et al. 2025).
    first_order: True (P2): the gradients fed to the LSTMs are constants; False: second-order
      meta-gradients through them.
    through_teleport: with ``first_order``, the gradient at a teleported point stays differentiable in the
      ``T`` that moved it there (second order along the teleport's path only), so the teleport LSTM learns
      from the gradient its teleport produces, not only from where the next update lands (P2: false).
    first_window_weight: the meta-loss of each trajectory's first window (inner steps 0 .. K-1) is multiplied
      by this before the meta-update (P2: 1): above 1, meta-training weighs the first steps more.
    lr_update: Adam step of the update LSTM (P2: 1e-3).
    lr_teleport: Adam step of the teleport LSTM (P2: 1e-4).
    lr_lr_teleport: Adam step of the LrTeleportLSTM (P2's code: 1e-4, hard-coded there).
    grad_clip: clip the meta-gradient to this global norm before the step (0 = off; P2: off).
    matmul_dtype: precision of the LSTMs' matrix products in meta-training: ``"same"`` as the weights (P2),
      or ``"bfloat16"`` (mixed precision: inputs, weights and the products' output gradients rounded to
      bfloat16, accumulated in float32; weights, their gradients, the optimiser and everything else stay in
      float32, and so does evaluation). Faster where the hardware has bfloat16 products (GPUs; CPUs with
      AVX512-BF16) and the products have more than a few rows; measured in docs/meta_learning.md, section 10.
    """

    unroll: int = 10
    meta_loss: str = "sum"
    decay: float = 1.0
    first_order: bool = True
    through_teleport: bool = False
    first_window_weight: float = 1.0
    lr_update: float = 1e-3
    lr_teleport: float = 1e-4
    lr_lr_teleport: float = 1e-4
    grad_clip: float = 0.0
    matmul_dtype: str = "same"

    def validate(self) -> None:
        _check_range("meta.unroll", self.unroll, 1, 10**6, integer=True)
        _check_choice("meta.meta_loss", self.meta_loss, META_LOSSES)
        _check_range("meta.decay", self.decay, 0, 1.0, lo_open=True)
        for k in ("first_order", "through_teleport"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"meta.{k} = {getattr(self, k)!r} must be true or false")
        for k in ("lr_update", "lr_teleport", "lr_lr_teleport"):
            _check_range(f"meta.{k}", getattr(self, k), 0, 1.0, lo_open=True)
        _check_range("meta.grad_clip", self.grad_clip, 0, None)
        _check_range("meta.first_window_weight", self.first_window_weight, 0, 1e6, lo_open=True)
        _check_choice("meta.matmul_dtype", self.matmul_dtype, MATMUL_DTYPES)


@dataclass
class TrainConfig:
    """Outer loop.

    seed: seeds the meta-optimisers' initialisation (trajectory seeds come from the problem streams).
    batch: initialisations (trajectories) per meta-batch, run as one batch (P2: 1). Under torchrun this is
      the global meta-batch, shared by the processes (:mod:`metatele.meta.distributed`).
    seed_offset: first training-seed index (train seeds are ``problems.train_seeds``: even numbers).
    device: ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` (under torchrun: ``cuda:LOCAL_RANK``)
      or ``"cuda:N"``.
    out: checkpoint folder.
    save_every: write the checkpoint every this many meta-batches (and at the end, and on Ctrl-C).
    select_every: keep the meta-parameters that do best on held-out training problems, checked every this
      many meta-batches and at the end (0: off, the final meta-parameters are the result). Evaluation and
      ``LearnedOptimizer.from_checkpoint`` use the selected ones; training goes on from the current ones.
    select_trajectories: held-out problems of that check (seeds of the training stream that no
      meta-batch uses, never evaluation seeds).
    select_horizon: the check runs ``select_horizon`` times the training horizon; the score is the mean
      ``log L`` over the problems and the steps of the training horizon (what meta-training optimises)
      plus a large penalty per problem whose loss is non-finite or spikes above 10x its running minimum
      at any step of the check: stability beyond the horizon is required.
    drop_diverged: when some trajectories of a meta-batch diverge (non-finite weights or loss), go on with
      the others (True) instead of abandoning the whole meta-batch (False: the behaviour before this
      option; data-parallel runs always abandon it). With many trajectories per meta-batch, abandoning
      loses most of the meta-updates of the methods that diverge more often.
    stagger: staggered truncations (False: P2, every trajectory of a meta-batch starts at step 0 together).
      The ``B`` trajectories of a meta-batch become a persistent population whose members are at different
      inner steps: their first lives end after ``K, 2K, ..., H`` steps (``K = meta.unroll``, ``H`` the
      horizon), and a trajectory that reaches its horizon (or diverges) is replaced by a new initialisation
      at the next window boundary. Every meta-update then averages windows from the whole horizon, instead
      of ``H / K`` consecutive meta-updates each seeing only one part of it; the trajectory-steps per
      meta-batch and the meta-updates are the same. learned_optimization trains its learned optimisers
      this way (tasks start at different inner iterations so that they do not run in lockstep).
      Single-process only; needs ``H`` a multiple of ``K`` and ``meta.first_window_weight = 1``.
    """

    seed: int = 0
    batch: int = 1
    seed_offset: int = 0
    device: str = "auto"
    out: str = "checkpoints"
    save_every: int = 10
    select_every: int = 0
    select_trajectories: int = 16
    select_horizon: float = 3.0
    drop_diverged: bool = True
    stagger: bool = False

    def validate(self) -> None:
        _check_range("train.seed", self.seed, 0, 2**63 - 1, integer=True)
        _check_range("train.batch", self.batch, 1, 10**6, integer=True)
        _check_range("train.seed_offset", self.seed_offset, 0, 10**12, integer=True)
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda") or (
                self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"train.device = {self.device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"train.out = {self.out!r} must be a folder path")
        _check_range("train.save_every", self.save_every, 1, 10**9, integer=True)
        _check_range("train.select_every", self.select_every, 0, 10**9, integer=True)
        _check_range("train.select_trajectories", self.select_trajectories, 1, 10**6, integer=True)
        _check_range("train.select_horizon", self.select_horizon, 1.0, 100.0)
        if not isinstance(self.drop_diverged, bool):
            raise ValueError(f"train.drop_diverged = {self.drop_diverged!r} must be true or false")
        if not isinstance(self.stagger, bool):
            raise ValueError(f"train.stagger = {self.stagger!r} must be true or false")


@dataclass
class EvalConfig:
    """Evaluation on unseen seeds (odd seeds, ``problems.eval_seeds``).

    seeds: number of evaluation initialisations (P2: 5; metatele: 20).
    seed_offset: first test-seed index.
    gd_lr: step size of the GD baselines (P2: 3e-4).
    tele_at: steps before which ``gd_tele`` teleports (hand-designed gradient-norm ascent, docs/mathematics.md, section 5).
    tele_steps: ascent steps per hand-designed teleport.
    tele_lr: ascent step size on T of the hand-designed teleport.
    tele_max_step_norm: clip each ascent step's ``||T||_F`` (``ds/dT`` is ~1e9 at the paper problem's
      initial loss, so an unclipped step overshoots; 0.01 matches the learned teleport's magnitude;
      0 = no clipping, the papers' rule).
    thresholds: loss thresholds of the speed-up table (steps to reach, relative to GD).
    report_steps: steps at which the summary table prints mean and std of the loss.
    """

    seeds: int = 20
    seed_offset: int = 0
    gd_lr: float = 3e-4
    tele_at: list[int] = field(default_factory=lambda: [0])
    tele_steps: int = 10
    tele_lr: float = 1e-7
    tele_max_step_norm: float = 0.01
    thresholds: list[float] = field(default_factory=lambda: [1000.0, 100.0, 30.0])
    report_steps: list[int] = field(default_factory=lambda: [0, 10, 30, 99])

    def validate(self) -> None:
        _check_range("eval.seeds", self.seeds, 1, 10**6, integer=True)
        _check_range("eval.seed_offset", self.seed_offset, 0, 10**12, integer=True)
        _check_range("eval.gd_lr", self.gd_lr, 0, 1.0, lo_open=True)
        for k in ("tele_at", "thresholds", "report_steps"):
            _check_list(f"eval.{k}", getattr(self, k))
        for i, t in enumerate(self.tele_at):
            _check_range(f"eval.tele_at[{i}]", t, 0, 10**9, integer=True)
        _check_range("eval.tele_steps", self.tele_steps, 1, 10**6, integer=True)
        _check_range("eval.tele_lr", self.tele_lr, 0, None, lo_open=True)
        _check_range("eval.tele_max_step_norm", self.tele_max_step_norm, 0, None)
        for i, t in enumerate(self.thresholds):
            _check_range(f"eval.thresholds[{i}]", t, 0, None, lo_open=True)
        for i, t in enumerate(self.report_steps):
            _check_range(f"eval.report_steps[{i}]", t, 0, 10**9, integer=True)


@dataclass
class MethodConfig:
    """Meta-training counts of one method: ``trajectories`` initialisations of ``steps`` inner steps,
    ``batch`` of them per meta-batch (0: ``train.batch``); ``magnitude``: this method's ``||T||_F``
    (0: ``teleport.magnitude``); ``magnitude_mode``: this method's ``"fixed"`` or ``"learned"`` distance
    ("": ``teleport.magnitude_mode``); ``threads``: torch CPU threads while this method meta-trains, unless
    the command line sets ``--threads`` (0: torch's default). A method with small LSTMs and few trajectories
    per meta-batch (LSTM(lr,tele) at 2) runs faster on one thread: a second one only adds synchronisation.
    ``until``: this method teleports only at inner steps ``t < until`` (0: ``teleport.until``, or its
    ``steps`` with ``teleport.until_horizon``), in training and in evaluation alike. ``stagger``: this
    method's ``train.stagger`` (absent: ``train.stagger``); a population of 2 trajectories cannot spread
    over a horizon of 30 windows, so LSTM(lr,tele) at 2 per meta-batch trains in lockstep.
    ``through_teleport``: this method's ``meta.through_teleport`` (absent: ``meta.through_teleport``).
    ``matmul_dtype``: this method's ``meta.matmul_dtype`` ("": ``meta.matmul_dtype``)."""

    trajectories: int
    steps: int
    batch: int = 0
    magnitude: float = 0.0
    magnitude_mode: str = ""
    threads: int = 0
    until: int = 0
    stagger: bool | None = None
    through_teleport: bool | None = None
    matmul_dtype: str = ""

    def validate(self, name: str) -> None:
        _check_range(f"methods.{name}.trajectories", self.trajectories, 1, 10**9, integer=True)
        _check_range(f"methods.{name}.steps", self.steps, 1, 10**7, integer=True)
        _check_range(f"methods.{name}.batch", self.batch, 0, 10**6, integer=True)
        _check_range(f"methods.{name}.magnitude", self.magnitude, 0, 1.0)
        _check_range(f"methods.{name}.threads", self.threads, 0, 4096, integer=True)
        _check_range(f"methods.{name}.until", self.until, 0, 10**9, integer=True)
        if self.magnitude_mode != "":
            _check_choice(f"methods.{name}.magnitude_mode", self.magnitude_mode, MAGNITUDE_MODES)
        if self.matmul_dtype != "":
            _check_choice(f"methods.{name}.matmul_dtype", self.matmul_dtype, MATMUL_DTYPES)
        for key in ("stagger", "through_teleport"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"methods.{name}.{key} = {value!r} must be true or false")


def _paper_methods() -> dict[str, MethodConfig]:
    return {k: MethodConfig(*v) for k, v in PAPER_COUNTS.items()}


@dataclass
class Config:
    problem: ProblemConfig = field(default_factory=ProblemConfig)
    lstm: LSTMConfig = field(default_factory=LSTMConfig)
    teleport: TeleportConfig = field(default_factory=TeleportConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: dict[str, MethodConfig] = field(default_factory=_paper_methods)

    def batch_of(self, method: str) -> int:
        """Trajectories per meta-batch of ``method``: its own ``batch``, else ``train.batch``."""
        m = self.methods.get(method)
        return m.batch if m is not None and m.batch > 0 else self.train.batch

    def _own(self, method: str, key: str, default):
        """``methods.<method>.<key>`` where the method sets it (not None), else ``default``."""
        value = getattr(self.methods[method], key) if method in self.methods else None
        return default if value is None else value

    def stagger_of(self, method: str) -> bool:
        """Whether ``method`` meta-trains with staggered truncations: its own ``stagger``, else ``train.stagger``."""
        return self._own(method, "stagger", self.train.stagger)

    def through_teleport_of(self, method: str) -> bool:
        """Whether ``method`` learns through its teleports: its own ``through_teleport``, else
        ``meta.through_teleport``."""
        return self._own(method, "through_teleport", self.meta.through_teleport)

    def matmul_dtype_of(self, method: str) -> str:
        """The precision of ``method``'s LSTM products in meta-training: its own ``matmul_dtype``, else
        ``meta.matmul_dtype``."""
        own = self._own(method, "matmul_dtype", "")
        return own or self.meta.matmul_dtype

    def threads_of(self, method: str) -> int:
        """Torch CPU threads for meta-training ``method`` (0: leave torch's setting)."""
        m = self.methods.get(method)
        return m.threads if m is not None else 0

    def teleport_of(self, method: str) -> TeleportConfig:
        """The teleport settings of ``method``: ``[teleport]`` with its own ``magnitude``,
        ``magnitude_mode`` and ``until`` where it has them; ``until`` resolved (the method's own, else its
        ``steps`` under ``until_horizon``, else ``teleport.until``)."""
        m = self.methods.get(method)
        own = {}
        if m is not None and m.magnitude > 0:
            own["magnitude"] = m.magnitude
        if m is not None and m.magnitude_mode:
            own["magnitude_mode"] = m.magnitude_mode
        if m is not None and m.until > 0:
            own["until"] = m.until
        elif m is not None and self.teleport.until_horizon:
            own["until"] = m.steps
        return dataclasses.replace(self.teleport, **own) if own else self.teleport

    def validate(self) -> "Config":
        self.problem.validate()
        self.lstm.validate()
        self.teleport.validate()
        self.meta.validate()
        self.train.validate()
        self.eval.validate()
        for name, m in self.methods.items():
            _check_choice("methods table name", name, METHODS)
            m.validate(name)
        return self


_SECTIONS = {"problem": ProblemConfig, "lstm": LSTMConfig, "teleport": TeleportConfig,
             "meta": MetaConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls, section: str, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise ValueError(f"[{section}] must be a table, got {data!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{section}]; allowed: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls(), k) if section != "methods" else None
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)  # TOML "1" for a float field
        kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (the TOML document's layout)."""
    unknown = sorted(set(data) - set(_SECTIONS) - {"methods"})
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; allowed: {sorted(list(_SECTIONS) + ['methods'])}")
    cfg = Config()
    for sec, cls in _SECTIONS.items():
        if sec in data:
            setattr(cfg, sec, _build(cls, sec, data[sec]))
    if "methods" in data:
        methods = _paper_methods()
        if not isinstance(data["methods"], dict):
            raise ValueError(f"[methods] must be a table of method tables, got {data['methods']!r}")
        for name, m in data["methods"].items():
            _check_choice("methods table name", name, METHODS)
            base = dataclasses.asdict(methods[name])
            if not isinstance(m, dict):
                raise ValueError(f"[methods.{name}] must be a table, got {m!r}")
            unknown = sorted(set(m) - set(base))
            if unknown:
                raise ValueError(f"unknown key(s) {unknown} in [methods.{name}]; allowed: {sorted(base)}")
            base.update(m)
            methods[name] = MethodConfig(**base)
        cfg.methods = methods
    return cfg.validate()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (JSON/TOML-able) of a configuration; inverse of :func:`config_from_dict`."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None) -> Config:
    """Read a TOML configuration (``None``: all defaults = the paper's values) and validate it."""
    if path is None:
        return Config().validate()
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"config file {str(p)!r} is a directory, not a TOML file")
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(p)!r} is not a text (UTF-8) TOML file: byte {e.start} "
                         f"cannot be decoded") from None
    except OSError as e:
        raise ValueError(f"config file {str(p)!r} cannot be read ({e.strerror or type(e).__name__})") from None
    return config_from_dict(data)
