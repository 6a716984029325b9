"""Evaluation of trained meta-optimisers against GD and GD with hand-designed teleport (docs/meta_learning.md, section 6).

Every method runs on exactly the same unseen initialisations (odd seeds, :func:`metatele.problems.eval_seeds`)
for the whole horizon under ``torch.no_grad`` (the public code evaluates without it: docs/departures.md, section 6).
Records per step: ``L(w_t)`` before the update of step t, ``||grad L(w_t)||^2``, cumulative wall-clock.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..baselines import run_gd
from ..checkpoint import ProblemMismatch
from ..config import EvalConfig, ProblemConfig
from ..devices import resolve_device
from ..learned.loading import DTYPES, load_method
from ..learned.methods import weight_shapes
from ..problems import eval_seeds, is_train_seed, regression_batch, train_seeds
from .unroll import rollout

__all__ = ["load_method", "resize_methods", "trained_seeds", "method_labels", "finite_or_none", "evaluate", "run_entry",
           "summary_table", "steps_to_reach"]


def trained_seeds(ck: dict[str, Any]) -> list[int]:
    """Training seeds a checkpoint has seen (from its progress and schedule)."""
    cfg = ck["config"]["train"]
    batch = int(ck["config"].get("methods", {}).get(ck["method"], {}).get("batch", 0) or cfg["batch"])
    n = int(ck["progress"]["meta_batch"]) * batch  # the global meta-batch of this method
    return train_seeds(n, start=int(cfg["seed_offset"]))


def method_labels(names: Sequence[str], paths: Sequence[str | Path]) -> list[str]:
    """One label per checkpoint: the method's name, or ``name@<folder>`` (``name@<k>`` if the folders
    coincide) when several checkpoints hold the same method (e.g. several meta-training seeds)."""
    labels = []
    for n, p in zip(names, paths):
        if names.count(n) == 1:
            labels.append(n)
            continue
        same = [Path(q) for m, q in zip(names, paths) if m == n]
        parents = [q.parent.name or str(q.parent) for q in same]
        key = Path(p).parent.name or str(Path(p).parent)
        labels.append(f"{n}@{key}" if len(set(parents)) == len(parents) else f"{n}@{same.index(Path(p))}")
    return labels


def finite_or_none(o):
    """``o`` (numbers, lists, tuples, dicts, nested) as strict JSON allows: every non-finite float becomes
    ``None`` (JSON ``null``); everything else is kept."""
    if isinstance(o, dict):
        return {k: finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_or_none(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def evaluate(ckpts: Sequence[str | Path], *, seeds: int | None = None, steps: int | None = None,
             eval_cfg: EvalConfig | None = None, include_baselines: bool = True,
             progress=None, device: str | torch.device | None = "cpu",
             dims: Sequence[int] | None = None) -> dict[str, Any]:
    """Evaluate every checkpoint's method plus ``gd`` and ``gd_tele`` on the same unseen seeds.

    seeds: number of evaluation initialisations (default ``eval.seeds`` of the first checkpoint's config);
    steps: horizon (default: the longest training horizon among the checkpoints).
    device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when there is one); the initialisations are
    drawn on CPU generators and moved, so every device sees the same problems.
    Several checkpoints of one method (e.g. several meta-training seeds) get distinct labels
    (:func:`method_labels`). Returns the ``results.json`` dict: ``{"methods": {label: {"method",
    loss_mean, loss_std, ..., "loss" (inits x steps), "grad_norm_sq" (inits x steps), "diverged"
    (per init)}}, "eval_seeds", "train_seeds", "steps", "dims"}``; curves are strict JSON (a
    non-finite loss is ``null``, its initialisation is marked diverged; the statistics are over the
    finite runs at each step).
    dims: evaluate on this problem ``[b, d_in, hidden..., d_out]`` instead of the checkpoints' own
    (:func:`resize_methods`: every meta-optimiser must be size-agnostic, else :class:`ProblemMismatch`).
    """
    loaded = [load_method(p) for p in ckpts]
    if dims is not None:
        loaded = resize_methods(loaded, ckpts, dims)
    if not loaded and eval_cfg is None:
        raise ValueError("need at least one checkpoint or an eval configuration")
    dims = list(loaded[0][1].problem.dims) if loaded else list(dims or [20, 20, 20, 20])
    for (m, c, _), p in zip(loaded, ckpts):
        if list(c.problem.dims) != dims:
            raise ProblemMismatch(f"{p} was trained on problem dims {c.problem.dims}, the first checkpoint "
                                  f"on {dims}: they cannot be compared on the same initialisations")
    names = [m.name for m, _, _ in loaded]
    labels = method_labels(names, ckpts)
    ecfg = eval_cfg or (loaded[0][1].eval if loaded else EvalConfig())
    n_seeds = ecfg.seeds if seeds is None else int(seeds)
    if n_seeds < 1:
        raise ValueError(f"seeds = {n_seeds} must be >= 1")
    if steps is None:
        steps = max((c.methods[m.name].steps for m, c, _ in loaded), default=100)
    if steps < 1:
        raise ValueError(f"steps = {steps} must be >= 1")
    dtype = DTYPES[loaded[0][1].problem.dtype] if loaded else torch.float32
    ev = eval_seeds(n_seeds, start=ecfg.seed_offset)
    tr = sorted({s for _, _, ck in loaded for s in trained_seeds(ck)})
    overlap = set(ev) & set(tr)
    if overlap or any(is_train_seed(s) for s in ev):  # impossible by construction; checked anyway
        raise RuntimeError(f"evaluation seeds overlap training seeds: {sorted(overlap)[:5]}")
    dev = resolve_device(device)
    prob = regression_batch(dims, ev, dtype=dtype, device=dev)
    runs: dict[str, dict[str, torch.Tensor]] = {}
    method_of = {}
    if include_baselines:
        r = run_gd(prob.weights, prob.X, prob.Y, steps=steps, lr=ecfg.gd_lr)
        runs["gd"] = {"loss": r.loss, "grad_norm_sq": r.grad_norm_sq, "time": r.time}
        at = [t for t in ecfg.tele_at if t < steps]
        r = run_gd(prob.weights, prob.X, prob.Y, steps=steps, lr=ecfg.gd_lr, teleport_at=at,
                   teleport_kwargs={"steps": ecfg.tele_steps, "lr": ecfg.tele_lr,
                                    "max_step_norm": ecfg.tele_max_step_norm or None})
        runs["gd_tele"] = {"loss": r.loss, "grad_norm_sq": r.grad_norm_sq, "time": r.time}
        method_of.update(gd="gd", gd_tele="gd_tele")
        if progress:
            progress("gd, gd_tele")
    for (m, _, _), label in zip(loaded, labels):
        runs[label] = rollout(m.to(dev), prob.weights, prob.X, prob.Y, steps)
        method_of[label] = m.name
        if progress:
            progress(label)
    out = {"methods": {}, "eval_seeds": ev, "train_seeds": tr, "steps": steps, "dims": dims,
           "checkpoints": {label: str(p) for label, p in zip(labels, ckpts)},
           "gd_lr": ecfg.gd_lr, "device": str(dev)}
    for name, r in runs.items():
        out["methods"][name] = run_entry(method_of[name], r)
    return out


def resize_methods(loaded: list, ckpts: Sequence[str | Path], dims: Sequence[int]) -> list:
    """``load_method`` results moved to the problem ``dims``: each method :meth:`~LearnedMethod.resized`
    to its weight shapes and its configuration's ``problem.dims`` set to ``dims``. Raises
    :class:`ProblemMismatch` naming the checkpoint and its fixed-size LSTM when one is not size-agnostic,
    ``ValueError`` for invalid ``dims``."""
    dims = [int(d) for d in dims]
    ProblemConfig(dims=dims).validate()
    out = []
    for (m, c, ck), p in zip(loaded, ckpts):
        try:
            m = m.resized(weight_shapes(dims))
        except ValueError as e:
            raise ProblemMismatch(f"{p} cannot be evaluated on dims {dims}: {e}") from None
        c = copy.deepcopy(c)
        c.problem.dims = list(dims)
        out.append((m, c, ck))
    return out


def run_entry(method: str, r: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The results.json entry of one evaluated method from its rollout tensors (``loss (B, steps)``,
    ``grad_norm_sq (B, steps)``, ``time (steps,)``, optional ``lr``): per-step statistics over the
    initialisations whose loss is finite at that step, and the per-initialisation curves."""
    L = r["loss"].detach().double().cpu()
    G = r["grad_norm_sq"].detach().double().cpu()
    ok = torch.isfinite(L)
    Ln = torch.where(ok, L, torch.full_like(L, float("nan")))
    entry = {"method": method,
             "loss_mean": Ln.nanmean(0).tolist(),
             "loss_std": _nanstd(Ln).tolist(),
             "loss_median": Ln.nanmedian(0).values.tolist(),
             "loss_min": torch.where(ok, L, torch.full_like(L, float("inf"))).min(0).values.tolist(),
             "loss_max": torch.where(ok, L, torch.full_like(L, float("-inf"))).max(0).values.tolist(),
             "grad_norm_mean": G.where(torch.isfinite(G), torch.full_like(G, float("nan"))).nanmean(0).tolist(),
             "time_mean": r["time"].double().tolist(),
             "final_loss": L[:, -1].tolist(),
             "loss": L.tolist(), "grad_norm_sq": G.tolist(),
             "diverged": (~ok.all(1)).tolist()}
    if "lr" in r and method == "lstm_lr_tele":
        entry["lr_mean"] = r["lr"].double().mean(0).tolist()
    return finite_or_none(entry)


def _nanstd(a: torch.Tensor) -> torch.Tensor:
    """Population std over dim 0 ignoring NaNs (NaN where no entry is finite)."""
    m = a.nanmean(0)
    return ((a - m) ** 2).nanmean(0).sqrt()


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def steps_to_reach(loss_mean: Sequence[float], threshold: float) -> int | None:
    """First step whose mean loss is <= ``threshold`` (None if never)."""
    for t, v in enumerate(loss_mean):
        if v is not None and math.isfinite(v) and v <= threshold:
            return t
    return None


def summary_table(results: dict[str, Any], report_steps: Sequence[int], thresholds: Sequence[float]) -> str:
    """Plain-text table: mean ± std of the loss at ``report_steps``, steps to reach each threshold and the
    speed-up ``steps(gd) / steps(method)``."""
    steps = results["steps"]
    rs = [t for t in report_steps if t < steps]
    if steps - 1 not in rs:
        rs.append(steps - 1)
    lines = []
    head = f"{'method':<18}" + "".join(f"{'loss@' + str(t):>22}" for t in rs)
    lines.append(head)
    for name, e in results["methods"].items():
        row = f"{name:<18}" + "".join(f"{_num(e['loss_mean'][t]):>12.4g} ± {_num(e['loss_std'][t]):<8.2g}" for t in rs)
        lines.append(row)
    lines.append("")
    head = f"{'method':<18}" + "".join(f"{'steps to ' + format(th, 'g'):>18}{'speed-up':>10}" for th in thresholds)
    lines.append(head)
    gd = results["methods"].get("gd")
    for name, e in results["methods"].items():
        row = f"{name:<18}"
        for th in thresholds:
            s = steps_to_reach(e["loss_mean"], th)
            s_gd = steps_to_reach(gd["loss_mean"], th) if gd else None
            sp = f"{(s_gd + 1) / (s + 1):.2f}x" if (s is not None and s_gd is not None) else "-"
            row += f"{('never' if s is None else str(s)):>18}{sp:>10}"
        lines.append(row)
    return "\n".join(lines)
