#!/usr/bin/env python
"""Ablation: how much of a trained method's result comes from its learned teleport?

Runs a checkpoint of ``lstm_update_tele`` or ``lstm_lr_tele`` on the unseen evaluation seeds twice: as
trained, and with the teleport switched off (``||T||_F = 0``, so ``g = I``; every other learned output,
including LSTM(lr,tele)'s step sizes, unchanged), and GD at the largest learned step size for reference.

    python benchmarks/meta_teleport_ablation.py CKPT [--seeds 20] [--steps 300]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from metatele.baselines import run_gd
    from metatele.meta.evaluate import load_method
    from metatele.meta.unroll import rollout
    from metatele.problems import eval_seeds, regression_batch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args(argv)
    m, cfg, _ = load_method(a.ckpt)
    if m.tele_nets is None:
        print(f"error: {a.ckpt} holds {m.name}, which has no learned teleport", file=sys.stderr)
        return 2
    steps = a.steps or cfg.methods[m.name].steps
    prob = regression_batch(cfg.problem.dims, eval_seeds(a.seeds, start=cfg.eval.seed_offset))
    at = sorted({t for t in (10, 30, 99, steps - 1) if t < steps})

    def show(label, L):
        bad = int((~torch.isfinite(L[:, -1])).sum())
        print(f"{label:<28}" + "".join(f"  L@{t}={float(L[:, t].mean()):.4g}" for t in at) + f"  non-finite {bad}")

    r = rollout(m, prob.weights, prob.X, prob.Y, steps)
    show(f"{m.name} as trained", r["loss"])
    for net in m.tele_nets:
        net.magnitude = 0.0
    show(f"{m.name} teleport off", rollout(m, prob.weights, prob.X, prob.Y, steps)["loss"])
    if m.learn_lr:
        lr = float(r["lr"][:, 1:].max())
        show(f"GD lr {lr:.3g}", run_gd(prob.weights, prob.X, prob.Y, steps=steps, lr=lr).loss)
    show(f"GD lr {cfg.eval.gd_lr:g}", run_gd(prob.weights, prob.X, prob.Y, steps=steps, lr=cfg.eval.gd_lr).loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
