#!/usr/bin/env python
"""Meta-training speed of LSTM(update,tele) at the paper's sizes: the papers' public code beside metatele,
in one run, one thread each (the machine's load affects both alike; compare the ratios).

    python benchmarks/meta_vs_public.py [--public DIR] [--batches 1 32] [--threads 1]

``--public DIR``: the ``learn-to-teleport`` folder of a copy of the public code of *Improving Convergence
and Generalization Using Parameter Symmetries* (github.com/Rose-STL-Lab/Teleportation-Optimization),
exported outside this repository; its ``train_meta_opt`` is timed on 3 trajectories of 100 steps after a
warm-up. metatele is timed with ``configs/paper_stable.toml`` (3 trajectories at batch 1, 64 at batch 32,
after a warm-up meta-batch). Prints milliseconds per inner step (per trajectory-step when batched).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = """
import time, warnings, torch
warnings.filterwarnings("ignore"); torch.set_num_threads({threads})
from gradient_descent_mlp import train_meta_opt
dim = [20, 20, 20, 20]
kw = dict(unroll=10, lr=1e-4, lr_meta=1e-3, learn_tele=True, T_magnitude=0.01)
train_meta_opt(dim, n_run=1, n_epoch=10, **kw)
t = time.perf_counter()
train_meta_opt(dim, n_run=3, n_epoch=100, **kw)
print(1e3 * (time.perf_counter() - t) / 300)
"""

OURS = """
import sys, time, torch
torch.set_num_threads({threads}); sys.path.insert(0, {root!r})
from metatele.config import load_config
from metatele.meta import MetaTrainer
cfg = load_config({root!r} + "/configs/paper_stable.toml")
cfg.train.batch = {batch}; cfg.train.device = "cpu"
cfg.methods["lstm_update_tele"].trajectories = {batch} * {n}
tr = MetaTrainer("lstm_update_tele", cfg)
tr.run_meta_batch()
t = time.perf_counter()
for _ in range({n} - 1):
    tr.run_meta_batch()
print(1e3 * (time.perf_counter() - t) / (({n} - 1) * {batch} * 100))
"""


def run(code: str, cwd: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"meta_vs_public.py: error: a timed run failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--public", default=None, help="the public code's learn-to-teleport folder (optional)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="trajectories per meta-batch")
    ap.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    args = ap.parse_args(argv)
    if args.public is not None and not (Path(args.public) / "gradient_descent_mlp.py").is_file():
        print(f"meta_vs_public.py: error: --public {args.public!r} has no gradient_descent_mlp.py", file=sys.stderr)
        return 2
    rows = []
    if args.public:
        rows.append(("public code, one trajectory at a time", run(PUBLIC.format(threads=args.threads),
                                                                  Path(args.public), args.threads)))
    for b in args.batches:
        n = 4 if b == 1 else 3
        rows.append((f"metatele, {b} per meta-batch", run(OURS.format(threads=args.threads, root=str(ROOT),
                                                                       batch=b, n=n), ROOT, args.threads)))
    ref = rows[0][1]
    for name, ms in rows:
        print(f"{name:<40} {ms:8.3f} ms per (trajectory-)step   {ref / ms:5.2f}x the first row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
