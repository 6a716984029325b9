#!/usr/bin/env python
"""Meta-training speed and memory of the three learned methods at the paper's sizes (docs/meta_learning.md).

For each method (paper architecture: UpdateLSTM 800-300-800, TeleportLSTM hidden 300, LrTeleportLSTM
hidden 20; problem dims [20, 20, 20, 20]; unroll 10; first-order) and each batch of initialisations
(1 and 32 by default) it runs one warm-up window and then ``--steps`` inner steps of meta-training
(forward, backward through the window, Adam step), and prints inner steps per second (trajectory-steps:
batch x steps / seconds) and the peak resident memory of a fresh process (``ru_maxrss``), next to the
resident memory right after importing torch (the difference is what meta-training itself takes).

    python benchmarks/meta.py [--batches 1 32] [--steps 40] [--threads 0] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lstm_update_tele", "lstm_update", "lstm_lr_tele")


def single(method: str, batch: int, steps: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from metatele.config import load_config
    from metatele.meta import MetaTrainer

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after importing torch
    cfg = load_config(ROOT / "configs" / "paper.toml")
    cfg.train.batch = batch
    cfg.methods[method].steps = steps + cfg.meta.unroll  # first window = warm-up
    cfg.methods[method].trajectories = batch
    tr = MetaTrainer(method, cfg)
    times = []
    tr.run_meta_batch(on_window=lambda info: times.append(time.perf_counter()))
    dt = times[-1] - times[0]
    return {"method": method, "batch": batch, "inner_steps": steps, "seconds": dt,
            "trajectory_steps_per_s": batch * steps / dt, "meta_updates_per_s": (len(times) - 1) / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "import_rss_mb": base_rss,
            "threads": torch.get_num_threads(), "meta_params": sum(p.numel() for p in tr.method.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=40, help="timed inner steps (multiple of the unroll 10)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--single", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.single:
        print(json.dumps(single(a.single[0], int(a.single[1]), a.steps, a.threads)))
        return 0
    rows = []
    print(f"{'method':<18}{'batch':>6}{'traj-steps/s':>14}{'meta-upd/s':>12}{'peak RSS MB':>13}"
          f"{'(import)':>10}{'threads':>9}")
    for m in a.methods:
        for b in a.batches:
            r = subprocess.run([sys.executable, __file__, "--single", m, str(b), "--steps", str(a.steps),
                                "--threads", str(a.threads)], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{m:<18}{b:>6}{row['trajectory_steps_per_s']:>14.1f}{row['meta_updates_per_s']:>12.2f}"
                  f"{row['peak_rss_mb']:>13.0f}{row['import_rss_mb']:>10.0f}{row['threads']:>9}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
