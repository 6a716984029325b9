#!/usr/bin/env python
"""Whole-horizon comparisons from an ``eval_meta.py`` results.json (the paper's two claims,
docs/meta_learning.md, section 9).

For each pair (A, B) -- LSTM(update,tele) vs LSTM(update), LSTM(lr,tele) vs GD -- prints on how many steps
A's mean loss (over seeds) is below B's and the first steps where it is not, and at the last step the
paired comparison over seeds (on how many seeds L_A < L_B, and the mean of log(L_A / L_B)).

    python benchmarks/meta_compare.py results/results.json
"""
from __future__ import annotations

import json
import math
import sys


def compare(res, a, b):
    A, B = res["methods"].get(a), res["methods"].get(b)
    if A is None or B is None:
        return f"{a} vs {b}: missing"
    la, lb = A["loss_mean"], B["loss_mean"]
    n = len(la)
    below = [t for t in range(1, n) if la[t] < lb[t]]
    not_below = [t for t in range(1, n) if not la[t] < lb[t]]
    fa, fb = A["final_loss"], B["final_loss"]
    wins = sum(x < y for x, y in zip(fa, fb))
    logs = [math.log(x / y) for x, y in zip(fa, fb) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    lr = f"{sum(logs) / len(logs):+.3f}" if logs else "nan"
    return (f"{a} vs {b}: mean loss lower on {len(below)}/{n - 1} steps (1..{n - 1})"
            + (f", not lower at steps {not_below[:8]}{' ...' if len(not_below) > 8 else ''}" if not_below else "")
            + f"; final step: lower on {wins}/{len(fa)} seeds, mean log(L_{a}/L_{b}) = {lr}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = json.load(open(argv[0]))
    print(f"{argv[0]}: {len(res['eval_seeds'])} seeds, {res['steps']} steps")
    print(compare(res, "lstm_update_tele", "lstm_update"))
    print(compare(res, "lstm_lr_tele", "gd"))
    print(compare(res, "lstm_update", "gd"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
