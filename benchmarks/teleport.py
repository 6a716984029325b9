"""Benchmark of the hand-designed teleport (issue: foundation).

Prints, for the meta-learning problem dims [20, 20, 20, 20] (batch 20, MSE) and the classification MLP
[784, 16, 10, 10] with batch 200 (cross-entropy):
  * the time of one teleport step (gradient-norm ascent, exact inverse-form action) relative to one GD step;
  * the wall time of GD with and without teleport over 300 steps on 32 initialisations, batched (one
    call for all 32) versus one at a time (a Python loop over the 32).

Usage: python benchmarks/teleport.py [--steps 300] [--n-init 32] [--repeats 20] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

from metatele import nets
from metatele.baselines import gd_step, run_gd
from metatele.teleport import teleport_weights


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
    return W, X, Y, "ce", dict(lr=5e-2), 1e-2


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-init", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, CPU")
    for name in ["regression [20,20,20,20]", "classification [784,16,10,10] batch 200"]:
        W, X, Y, loss, tk, lr = _problem(name, 1)
        W1, X1, Y1 = tuple(w[0] for w in W), X[0], Y[0]
        t_gd = _time(lambda: gd_step(W1, X1, Y1, lr, loss=loss), args.repeats)
        t_tp = _time(lambda: teleport_weights(W1, X1, Y1, loss=loss, steps=1, **tk), args.repeats)
        t_t11 = _time(lambda: teleport_weights(W1, X1, Y1, loss=loss, steps=11, **tk), max(args.repeats // 4, 2))
        t_step = (t_t11 - t_tp) / 10
        print(f"\n{name}")
        print(f"  one GD step                         {t_gd * 1e3:8.3f} ms")
        print(f"  teleport call with one step         {t_tp * 1e3:8.3f} ms   ({t_tp / t_gd:.1f}x a GD step; "
              f"includes the exactness check and X^+)")
        print(f"  each further teleport step          {t_step * 1e3:8.3f} ms   ({t_step / t_gd:.1f}x a GD step)")

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
        print(f"  {args.steps} steps on {args.n_init} initialisations:  batched   one-at-a-time   speed-up")
        for label, tb, tl in rows:
            print(f"    {label:<15} {tb:8.2f} s   {tl:10.2f} s   {tl / tb:6.1f}x")


if __name__ == "__main__":
    main()
