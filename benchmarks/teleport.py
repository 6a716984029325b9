"""Benchmark of the hand-designed teleport (issue 9, Speed).

Prints, for the meta-learning problem dims [20, 20, 20, 20] (batch 20, MSE: the action is exact) and the
classification MLP [784, 16, 10, 10] with batch 200 (cross-entropy: the action is approximate):
  * the time of a teleport call with one step, and of each further step (gradient-norm ascent, inverse-form
    action), relative to one GD step, for
      - "papers' rule": the raw rule as the earlier benchmark ran it (regression: lr 1e-8 clipped to
        ||T||_F <= 0.05; classification: lr 5e-2), comparable across versions, and
      - "default": metatele's default call (normalised steps, guarded), where the library has it;
  * the wall time of GD with and without teleport over 300 steps on 32 initialisations, batched (one
    call for all 32) versus one at a time (a Python loop over the 32), with the papers' rule.

Every time is the fastest of ``--blocks`` blocks of repeated calls (the machine may be loaded: the minimum is
the least disturbed estimate), measured interleaved, so the ratios are comparable between runs.

Usage: python benchmarks/teleport.py [--steps 300] [--n-init 32] [--repeats 20] [--blocks 5] [--threads N]
"""
from __future__ import annotations

import argparse
import inspect
import time

import torch

from metatele import nets
from metatele.baselines import gd_step, run_gd
from metatele.teleport import teleport_weights

HAS_RULE = "rule" in inspect.signature(teleport_weights).parameters


def _problem(name: str, n_init: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "regression [20,20,20,20]":
        dims = [20, 20, 20, 20]
        W = nets.init_uniform(dims, g, n_init=n_init)
        X, Y = nets.regression_data(dims, g, n_init=n_init)
        return W, X, Y, "mse", dict(lr=1e-8, max_step_norm=0.05), 3e-4
    widths = [784, 16, 10, 10]
    W = nets.init_linear(widths, g, bias=False, n_init=n_init)
    X = torch.rand(n_init, 784, 200, generator=g)
    Y = torch.randint(0, 10, (n_init, 200), generator=g)
    paper = dict(lr=5e-2, rule="raw") if HAS_RULE else dict(lr=5e-2)
    return W, X, Y, "ce", paper, 1e-2


def _times(fns: dict, repeats: dict, blocks: int) -> dict:
    """The fastest block mean of each function, blocks interleaved across the functions."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(blocks):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(repeats[k]):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / repeats[k])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-init", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, CPU; fastest of {args.blocks} "
          f"blocks")
    for name in ["regression [20,20,20,20]", "classification [784,16,10,10] batch 200"]:
        W, X, Y, loss, tk, lr = _problem(name, 1)
        W1, X1, Y1 = tuple(w[0] for w in W), X[0], Y[0]
        rules = {"papers' rule": tk}
        if HAS_RULE:
            rules["default"] = {}
        fns = {"gd": lambda: gd_step(W1, X1, Y1, lr, loss=loss)}
        reps = {"gd": args.repeats}
        for label, kw in rules.items():
            fns[(label, 1)] = lambda kw=kw: teleport_weights(W1, X1, Y1, loss=loss, steps=1, **kw)
            fns[(label, 11)] = lambda kw=kw: teleport_weights(W1, X1, Y1, loss=loss, steps=11, **kw)
            reps[(label, 1)] = max(args.repeats // 2, 2)
            reps[(label, 11)] = max(args.repeats // 8, 2)
        t = _times(fns, reps, args.blocks)
        t_gd = t["gd"]
        print(f"\n{name}")
        print(f"  one GD step                                       {t_gd * 1e3:8.3f} ms")
        for label in rules:
            t1, t11 = t[(label, 1)], t[(label, 11)]
            step = (t11 - t1) / 10
            print(f"  {label + ':':<14} teleport call with one step     {t1 * 1e3:8.3f} ms   ({t1 / t_gd:.1f}x a GD "
                  f"step; includes the exactness check and X^+)")
            print(f"  {label + ':':<14} each further teleport step      {step * 1e3:8.3f} ms   ({step / t_gd:.1f}x a "
                  f"GD step)")

        W, X, Y, loss, tk, lr = _problem(name, args.n_init)
        sched = dict(teleport_at=[5], teleport_kwargs=dict(steps=8, **tk))
        rows = []
        for label, kw in [("GD", {}), ("GD + teleport", sched)]:
            t0 = time.perf_counter()
            run_gd(W, X, Y, steps=args.steps, lr=lr, loss=loss, **kw)
            t_batched = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(args.n_init):
                run_gd(tuple(w[i] for w in W), X[i], Y[i], steps=args.steps, lr=lr, loss=loss, **kw)
            t_loop = time.perf_counter() - t0
            rows.append((label, t_batched, t_loop))
        print(f"  {args.steps} steps on {args.n_init} initialisations (papers' rule):  batched   one-at-a-time   "
              f"speed-up")
        for label, tb, tl in rows:
            print(f"    {label:<15} {tb:8.2f} s   {tl:10.2f} s   {tl / tb:6.1f}x")


if __name__ == "__main__":
    main()
