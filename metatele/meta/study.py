"""Several meta-training seeds per method as one study: train (resumable), evaluate, compare.

    python -m metatele.meta.study --config configs/paper_fast.toml --seeds 5 --out results/study_fast
        [--methods lstm_update_tele lstm_update] [--first-seed 0] [--eval-seeds 20] [--horizon 3]
        [--set meta.lr_update=3e-3 --set train.batch=32] [--threads 1] [--no-eval] [--no-plots]

Meta-training seed ``k`` initialises the LSTMs from seed ``k`` and trains them on trajectories of their own
(``train.seed_offset = k * n``, ``n`` the largest trajectory count of the configuration), so seeds differ
in initialisation *and* data; the evaluation initialisations are the same unseen ones for every seed and
method (odd problem seeds, never used in training). A checkpoint that is already complete is skipped, an
incomplete one (a killed run) is resumed, so re-running the same command continues a study.

Each trained checkpoint, GD and GD with hand-designed teleport run for ``horizon`` times the training
horizon under ``torch.no_grad``. The report (``study.md``, ``study.json``, ``study.png`` in ``--out``):

* per method, the mean loss over the evaluation initialisations of each training seed, then mean ± std
  *across training seeds*, at steps 10, 30, the last step of each method's training horizon, ``horizon``
  times it, and the last evaluated step;
* for LSTM(update,tele) vs LSTM(update) (and LSTM(lr,tele) vs GD): over the (training seed, evaluation
  initialisation) pairs, the fraction where the first is lower and a bootstrap 95% interval of the mean
  log-ratio ``log L_first - log L_second`` (resampling seeds and initialisations, crossed);
* how many evaluation runs diverge (non-finite loss) or spike (loss above ``spike_factor`` times its
  running minimum at some step);
* the wall time of meta-training per seed (all methods) and of the evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..checkpoint import CheckpointError, CheckpointLock, check_output_dir, load_checkpoint
from ..config import METHODS, Config, config_from_dict, config_to_dict, load_config
from ..devices import cpu_threads
from .evaluate import evaluate, finite_or_none
from .figures import LABELS
from .trainer import MetaTrainer

__all__ = ["apply_overrides", "seed_config", "train_seed", "curves_by_method", "compare", "spikes",
           "study_tables", "run_study", "main"]

PAIRS = (("lstm_update_tele", "lstm_update"), ("lstm_lr_tele", "gd"))
#: The loss a diverged evaluation run counts as in the pair statistics (log-ratio about +/-46 against 10).
DIVERGED = 1e21


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["meta.lr_update=3e-3", "methods.lstm_update.trajectories=64"]`` applied to a config dict (values
    in TOML syntax: numbers, ``true``, ``"text"``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. meta.lr_update=3e-3")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"--set {item!r}: {raw.strip()!r} is not a TOML value") from None
        d = data
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a table")
        d[parts[-1]] = value
    return data


def seed_config(base: Config, k: int) -> Config:
    """The configuration of meta-training seed ``k``: LSTM initialisation seed ``k`` and a disjoint block
    of training trajectories."""
    d = config_to_dict(base)
    stride = max(m["trajectories"] for m in d["methods"].values())
    d["train"]["seed"] = int(k)
    d["train"]["seed_offset"] = int(base.train.seed_offset) + int(k) * stride
    return config_from_dict(d)


def train_seed(cfg: Config, method: str, path: Path, *, log=print, threads: int = 0) -> float:
    """Meta-train ``method`` into ``path`` (resuming an incomplete checkpoint, skipping a complete one).
    Returns the meta-training wall time in seconds (from the checkpoint's progress). The checkpoint is
    locked while it is trained (a second study process on the same seed stops with an error).
    threads: the command line's ``--threads`` (0: the method's own ``methods.<name>.threads``, if any)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with CheckpointLock(path), cpu_threads(threads or cfg.threads_of(method)):
        return _train_locked(cfg, method, path, log)


def _train_locked(cfg: Config, method: str, path: Path, log) -> float:
    tr = MetaTrainer(method, cfg)
    if path.exists():
        ck = load_checkpoint(path)
        tr.load_payload(ck, str(path))
        if tr.progress.meta_batch >= tr.n_meta_batches:
            log(f"{path}: complete ({tr.progress.meta_batch} meta-batches), skipped")
            return tr.progress.wall
        log(f"{path}: resuming at meta-batch {tr.progress.meta_batch} of {tr.n_meta_batches}")
    path.parent.mkdir(parents=True, exist_ok=True)
    while tr.progress.meta_batch < tr.n_meta_batches:
        tr.run_meta_batch()
        if tr.progress.meta_batch % cfg.train.save_every == 0:
            tr.save(path)
    tr.save(path)
    p = tr.progress
    log(f"{path}: {p.meta_batch} meta-batches, {p.updates} meta-updates, {p.skipped} skipped, "
        f"{p.diverged} meta-batches abandoned, {p.dropped} diverged trajectories dropped, {p.wall:.1f} s")
    return p.wall


def curves_by_method(results: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{method: loss (seeds, inits, steps)}`` from an :func:`~metatele.meta.evaluate.evaluate` result
    (labels ``method@seedK`` grouped in seed order; GD baselines have one 'seed'); ``null`` -> inf."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for label, e in results["methods"].items():
        a = np.array([[np.inf if v is None else v for v in row] for row in e["loss"]], dtype=float)
        groups.setdefault(e["method"], []).append((label, a))
    return {m: np.stack([a for _, a in sorted(g, key=lambda x: _seed_key(x[0]))]) for m, g in groups.items()}


def _seed_key(label: str):
    tail = label.rpartition("@seed")[2]
    return int(tail) if tail.isdigit() else label


def compare(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """``a (S, N)`` vs ``b (S or 1, N)`` losses at one step over (training seed, initialisation) pairs:
    fraction of pairs with ``a < b``, mean log-ratio and its crossed bootstrap 95% interval (a
    non-finite loss counts as :data:`DIVERGED`)."""
    b = np.broadcast_to(b, a.shape)
    # a diverged run (non-finite loss) counts as a loss of DIVERGED, so that it weighs heavily against
    # its method in the log-ratio without making the mean infinite; two diverged runs tie
    a_, b_ = np.where(np.isfinite(a), a, DIVERGED), np.where(np.isfinite(b), b, DIVERGED)
    lr = np.log(a_) - np.log(b_)
    rng = np.random.default_rng(seed)
    S, N = lr.shape
    boots = np.empty(n_boot)
    for i in range(n_boot):
        si, ni = rng.integers(0, S, S), rng.integers(0, N, N)
        boots[i] = lr[np.ix_(si, ni)].mean()
    return {"frac_lower": float((a_ < b_).mean()), "mean_log_ratio": float(lr.mean()),
            "ci_low": float(np.quantile(boots, 0.025)), "ci_high": float(np.quantile(boots, 0.975)),
            "pairs": int(S * N)}


def spikes(L: np.ndarray, factor: float = 10.0) -> dict[str, Any]:
    """Runs ``L (..., steps)`` that diverge (a non-finite loss) or spike (a loss above ``factor`` times the
    running minimum of the earlier steps), counted over all leading indices, and ``max_rise``: the largest
    ``L_t / min_{s<t} L_s`` over the runs that did not diverge (1.0: no run ever rose; a bump below the
    spike threshold shows here)."""
    runs = L.reshape(-1, L.shape[-1])
    bad = ~np.isfinite(runs)
    diverged = bad.any(1)
    r = np.where(bad, np.inf, runs)
    run_min = np.minimum.accumulate(r, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = r[:, 1:] / run_min[:, :-1]
    spiked = (r[:, 1:] > factor * run_min[:, :-1]).any(1) & ~diverged
    finite = rise[~diverged]
    max_rise = float(max(1.0, np.nanmax(finite))) if finite.size else float("nan")
    return {"runs": int(runs.shape[0]), "diverged": int(diverged.sum()), "spiked": int(spiked.sum()),
            "max_rise": max_rise}


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.4g}"


def study_tables(curves: dict[str, np.ndarray], steps: Sequence[int], *, spike_factor: float = 10.0
                 ) -> tuple[str, dict[str, Any]]:
    """Markdown tables of a study and the same numbers as a dict (see the module docstring)."""
    order = [m for m in ("gd", "gd_tele", "lstm_lr_tele", "lstm_update", "lstm_update_tele") if m in curves]
    stats: dict[str, Any] = {"loss": {}, "pairs": {}, "runs": {}}
    lines = ["| method | seeds | " + " | ".join(f"loss at step {t}" for t in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for m in order:
        per_seed = curves[m].mean(1)  # (S, steps): mean over initialisations (inf if one diverged)
        cells, row = [], {}
        for t in steps:
            v = per_seed[:, t]
            mu, sd = float(v.mean()), float(v.std()) if len(v) > 1 else 0.0
            row[t] = {"mean": mu, "std": sd, "per_seed": v.tolist()}
            cells.append(f"{_fmt(mu)} ± {_fmt(sd)}" if len(v) > 1 else _fmt(mu))
        stats["loss"][m] = row
        lines.append(f"| {m} | {curves[m].shape[0]} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison | step | lower on (pairs) | mean log-ratio | bootstrap 95% interval |",
              "|---|---|---|---|---|"]
    for a, b in PAIRS:
        if a not in curves or b not in curves:
            continue
        for t in steps:
            c = compare(curves[a][:, :, t], curves[b][:, :, t])
            stats["pairs"][f"{a} vs {b} @ {t}"] = c
            lines.append(f"| {a} vs {b} | {t} | {c['frac_lower']:.0%} of {c['pairs']} | "
                         f"{c['mean_log_ratio']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] |")
    lines += ["", f"| method | runs | diverged | spiked (> {spike_factor:g}x running minimum) | largest rise |",
              "|---|---|---|---|---|"]
    for m in order:
        s = spikes(curves[m], spike_factor)
        stats["runs"][m] = s
        lines.append(f"| {m} | {s['runs']} | {s['diverged']} | {s['spiked']} | {_fmt(s['max_rise'])}x |")
    return "\n".join(lines), stats


def plot_study(curves: dict[str, np.ndarray], train_steps: Sequence[int], out: Path, stem: str = "study") -> Path:
    """One line per method (mean over training seeds of the per-seed mean loss) and a band (min to max
    across training seeds), log scale; the training horizon is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, L in curves.items():
        per_seed = L.mean(1)
        x = np.arange(per_seed.shape[1])
        finite = np.where(np.isfinite(per_seed), per_seed, np.nan)
        line, = ax.plot(x, np.nanmean(finite, 0), label=f"{LABELS.get(m, m)} ({L.shape[0]} seeds)")
        if L.shape[0] > 1:
            ax.fill_between(x, np.nanmin(finite, 0), np.nanmax(finite, 0), color=line.get_color(), alpha=0.2)
    for h in train_steps:  # the training horizons
        ax.axvline(h - 1, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over unseen initialisations)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_study(cfg: Config, methods: Sequence[str], seeds: Sequence[int], out: Path, *, eval_seeds: int = 20,
              horizon: float = 3.0, do_eval: bool = True, plots: bool = True, log=print,
              command: str = "", threads: int = 0, eval_offset: int | None = None) -> dict[str, Any] | None:
    """Train every (seed, method) not yet complete, then evaluate and report (module docstring).
    threads: the command line's ``--threads`` (0: each method's own ``methods.<name>.threads``, if any).
    eval_offset: first evaluation initialisation (default ``eval.seed_offset``); when given, the report is
    ``study_eval<offset>.*``, beside the main one, e.g. to check a recipe on problems it was not chosen on."""
    out.mkdir(parents=True, exist_ok=True)
    train_wall: dict[str, dict[str, float]] = {}
    for k in seeds:
        scfg = seed_config(cfg, k)
        for m in methods:
            train_wall.setdefault(f"seed{k}", {})[m] = round(train_seed(scfg, m, out / f"seed{k}" / f"{m}.pt",
                                                                        log=log, threads=threads), 2)
    if not do_eval:
        return None
    ckpts = [out / f"seed{k}" / f"{m}.pt" for k in seeds for m in methods]
    train_steps = max(cfg.methods[m].steps for m in methods)
    H = max(train_steps, int(round(horizon * train_steps)))
    t0 = time.perf_counter()
    ecfg = cfg.eval if eval_offset is None else dataclasses.replace(cfg.eval, seed_offset=int(eval_offset))
    res = evaluate(ckpts, seeds=eval_seeds, steps=H, device="cpu", eval_cfg=ecfg)
    stem = "study" if eval_offset is None else f"study_eval{int(eval_offset)}"
    eval_wall = time.perf_counter() - t0
    curves = curves_by_method(res)
    horizons = sorted({cfg.methods[m].steps for m in methods})
    marks = {10, 30, H - 1} | {h - 1 for h in horizons} | {int(round(horizon * h)) - 1 for h in horizons}
    steps = sorted(t for t in marks if 0 <= t < H)
    table, stats = study_tables(curves, steps)
    per_seed_wall = {k: round(sum(v.values()), 1) for k, v in train_wall.items()}
    head = [f"# Meta-training seeds study", "",
            f"Command: `{command}`" if command else "",
            f"Methods {list(methods)}, training seeds {list(seeds)}, {eval_seeds} unseen initialisations "
            f"(odd seeds {res['eval_seeds'][0]}-{res['eval_seeds'][-1]}), "
            f"evaluated for {H} steps (training horizons {horizons}); loss = mean over the initialisations "
            f"of one training seed, then mean ± std across training seeds.", "",
            f"Meta-training wall time per seed (all methods, s): {per_seed_wall}; evaluation {eval_wall:.1f} s.",
            ""]
    text = "\n".join(head) + table + "\n"
    (out / f"{stem}.md").write_text(text)
    summary = {"config": config_to_dict(cfg), "methods": list(methods), "seeds": list(seeds),
               "eval_seeds": res["eval_seeds"], "steps": H, "train_steps": train_steps,
               "train_wall_s": train_wall, "eval_wall_s": round(eval_wall, 2), "stats": stats,
               "curves": {m: L.tolist() for m, L in curves.items()}}
    (out / f"{stem}.json").write_text(json.dumps(finite_or_none(summary), allow_nan=False))
    if plots:
        plot_study(curves, horizons, out, stem)
    log(text)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metatele.meta.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/paper_fast.toml", help="TOML configuration")
    ap.add_argument("--seeds", type=int, default=5, help="meta-training seeds per method (default 5)")
    ap.add_argument("--first-seed", type=int, default=0, help="first meta-training seed (default 0)")
    ap.add_argument("--methods", nargs="+", default=None, help="methods (default: all in the configuration)")
    ap.add_argument("--out", required=True, help="study folder (checkpoints, study.md, study.json, study.png)")
    ap.add_argument("--eval-seeds", type=int, default=20, help="unseen initialisations (default 20)")
    ap.add_argument("--eval-offset", type=int, default=None,
                    help="first unseen initialisation (default: eval.seed_offset); the report is then "
                         "study_eval<offset>.md/.json/.png, beside study.md")
    ap.add_argument("--horizon", type=float, default=3.0, help="evaluation horizon / training horizon (default 3)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a configuration value (repeatable), e.g. --set meta.lr_update=3e-3")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-eval", action="store_true", help="train only (e.g. seeds split over processes)")
    ap.add_argument("--no-plots", action="store_true", help="skip study.png")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"study: error: {msg}", file=sys.stderr)
        return 2

    if args.threads < 0:
        return fail(f"--threads {args.threads} must be >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.seeds < 1 or args.first_seed < 0:
        return fail(f"--seeds {args.seeds} must be >= 1 and --first-seed {args.first_seed} >= 0")
    if args.eval_offset is not None and args.eval_offset < 0:
        return fail(f"--eval-offset {args.eval_offset} must be >= 0")
    if args.eval_seeds < 1 or not args.horizon >= 1:
        return fail(f"--eval-seeds {args.eval_seeds} must be >= 1 and --horizon {args.horizon} >= 1")
    out = Path(args.out)
    try:
        check_output_dir(out)
        cfg = load_config(args.config)
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), args.set))
        methods = args.methods or [m for m in METHODS if m in cfg.methods]
        for m in methods:
            if m not in cfg.methods:
                raise ValueError(f"--methods {m!r} is not configured; allowed: {sorted(cfg.methods)}")
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        command = "python -m metatele.meta.study " + " ".join(argv if argv is not None else sys.argv[1:])
        run_study(cfg, methods, seeds, out, eval_seeds=args.eval_seeds, horizon=args.horizon,
                  do_eval=not args.no_eval, plots=not args.no_plots, command=command, threads=args.threads,
                  eval_offset=args.eval_offset)
    except (ValueError, CheckpointError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
