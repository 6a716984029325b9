#!/usr/bin/env python
"""float32 against bfloat16 matrix products in meta-training (``meta.matmul_dtype``; docs/meta_learning.md,
section 10.9), side by side in one process.

1. The LSTMs' matrix products alone, at the shapes meta-training runs (``[rows, in] x [in, out]``), in
   float32 and bfloat16: milliseconds per product.
2. Meta-training with ``configs/paper_fast.toml``: one trainer per method, whose meta-batches alternate
   between float32 and bfloat16 products (``rounds`` of each after one warm-up meta-batch), so both see the
   same machine state; the median seconds per meta-batch and their ratio.

    python benchmarks/meta_precision.py [--threads 2] [--rounds 3] [--methods lstm_update_tele lstm_update]

The ratios are what to compare: the machine's speed drifts between runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(32, 1600, 1200), (16, 1200, 1600), (32, 300, 1200), (16, 800, 1200), (1, 1600, 1200)]


def product_times(reps: int = 100) -> list[tuple[tuple[int, int, int], float, float]]:
    """``(shape, ms in float32, ms in bfloat16)`` for ``x (rows, in) @ W (in, out)``."""
    import torch
    out = []
    for rows, n_in, n_out in SHAPES:
        ms = []
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(rows, n_in, dtype=dtype), torch.randn(n_in, n_out, dtype=dtype)
            for _ in range(5):
                x @ w
            t = time.perf_counter()
            for _ in range(reps):
                x @ w
            ms.append(1e3 * (time.perf_counter() - t) / reps)
        out.append(((rows, n_in, n_out), ms[0], ms[1]))
    return out


def meta_batch_times(method: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per meta-batch of ``method`` (paper_fast), float32 and bfloat16 products alternating."""
    import torch
    from metatele.config import load_config
    from metatele.meta import MetaTrainer
    tr = MetaTrainer(method, load_config(ROOT / "configs" / "paper_fast.toml"))
    tr.run_meta_batch()
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(rounds):
        for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            tr.method.defer_weight_grads(True, dtype)
            t = time.perf_counter()
            tr.run_meta_batch()
            times[name].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="meta-batches of each precision per method (default 3)")
    p.add_argument("--methods", nargs="+", default=["lstm_update_tele", "lstm_update"])
    args = p.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1")
    import torch
    torch.set_num_threads(1)
    print("matrix products, one thread: ms in float32 | bfloat16 | speed-up")
    for (rows, n_in, n_out), f32, bf16 in product_times():
        print(f"  [{rows}, {n_in}] x [{n_in}, {n_out}]: {f32:.3f} | {bf16:.3f} | {f32 / bf16:.2f}x")
    torch.set_num_threads(args.threads)
    print(f"meta-training, configs/paper_fast.toml, {args.threads} thread(s): median s per meta-batch "
          f"over {args.rounds} alternating rounds")
    for method in args.methods:
        t = meta_batch_times(method, args.rounds)
        f32, bf16 = statistics.median(t["float32"]), statistics.median(t["bfloat16"])
        print(f"  {method}: float32 {f32:.3f} | bfloat16 {bf16:.3f} | {100 * (bf16 / f32 - 1):+.0f}%")


if __name__ == "__main__":
    main()
