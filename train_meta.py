#!/usr/bin/env python
"""Meta-train P2's learned optimisers (P2 section 6; docs/meta_learning.md) and write one checkpoint per method.

    python train_meta.py                                  # configs/default.toml, all three methods
    python train_meta.py --config configs/paper.toml      # the paper's counts
    python train_meta.py --method lstm_lr_tele --trajectories 8 --steps 50 --batch 4
    python train_meta.py --resume checkpoints/lstm_update.pt
    torchrun --nproc_per_node=2 train_meta.py --batch 8   # data-parallel: 2 processes share each meta-batch

Checkpoints go to ``<out>/<method>.pt`` (``--out``, default ``train.out`` = ``checkpoints``), every
``train.save_every`` meta-batches, at the end, and on Ctrl-C (the state at the last completed
meta-batch, so ``--resume`` continues exactly as an uninterrupted run would). A non-finite meta-loss or
meta-gradient skips that meta-update (counted and printed at the end). Exit codes: 0 done, 2 bad
configuration or checkpoint, 130 interrupted (after saving).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.toml"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="TOML configuration (default: configs/default.toml)")
    ap.add_argument("--method", action="append", default=None,
                    help="lstm_update_tele, lstm_update or lstm_lr_tele; repeatable (default: all three)")
    ap.add_argument("--trajectories", type=int, default=None, help="training trajectories per method")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per trajectory")
    ap.add_argument("--unroll", type=int, default=None, help="truncation window K")
    ap.add_argument("--batch", type=int, default=None, help="initialisations per meta-batch")
    ap.add_argument("--seed", type=int, default=None, help="seed of the meta-optimisers' initialisation")
    ap.add_argument("--device", default=None,
                    help="auto (a GPU when there is one), cpu, cuda or cuda:N (default: train.device of the "
                         "configuration, 'auto'; on --resume: auto). Under torchrun each rank uses cuda:LOCAL_RANK")
    ap.add_argument("--backend", default="auto",
                    help="torch.distributed backend under torchrun: auto (nccl on GPU, gloo on CPU), gloo, nccl")
    ap.add_argument("--out", default=None, help="checkpoint folder")
    ap.add_argument("--resume", action="append", default=None, metavar="CKPT",
                    help="continue the run saved in CKPT (repeatable); its own configuration is used")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return ap.parse_args(argv)


def _fail(msg: str) -> int:
    print(f"train_meta.py: error: {msg}", file=sys.stderr)
    return 2


def build_config(args):
    from metatele.config import METHODS, load_config

    path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = load_config(path)
    methods = args.method or [m for m in METHODS if m in cfg.methods]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--method {m!r} is not a learned method; allowed: {list(METHODS)}")
    for m in methods:
        if args.trajectories is not None:
            cfg.methods[m].trajectories = args.trajectories
        if args.steps is not None:
            cfg.methods[m].steps = args.steps
    if args.unroll is not None:
        cfg.meta.unroll = args.unroll
    if args.batch is not None:  # every method, also those with their own methods.<name>.batch
        cfg.train.batch = args.batch
        for m in cfg.methods.values():
            m.batch = 0
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.device is not None:
        cfg.train.device = args.device
    if args.out is not None:
        cfg.train.out = args.out
    return cfg.validate(), methods


def train_one(trainer, path: Path, show_progress: bool) -> tuple[bool, dict]:
    """Train until done; returns (interrupted, summary)."""
    from tqdm import tqdm

    total = trainer.n_meta_batches
    bar = tqdm(total=total, initial=trainer.progress.meta_batch, desc=trainer.name, unit="batch",
               disable=not show_progress, dynamic_ncols=True)
    ema = None
    snapshot = trainer.payload()
    interrupted = False
    try:
        while trainer.progress.meta_batch < total:
            snapshot = trainer.payload()
            r = trainer.run_meta_batch()
            m = r["meta_loss"]
            if math.isfinite(m):
                ema = m if ema is None else 0.9 * ema + 0.1 * m
            bar.set_postfix(meta_loss=f"{ema:.4g}" if ema is not None else "nan",
                            skipped=trainer.progress.skipped)
            bar.update(1)
            if trainer.progress.meta_batch % trainer.cfg.train.save_every == 0:
                trainer.save(path)
        trainer.save(path)
    except KeyboardInterrupt:
        interrupted = True
        trainer.save(path, snapshot)  # state at the last completed meta-batch
    except RuntimeError:
        if trainer.world_size > 1:  # a peer process failed (collective error): keep the last completed
            trainer.save(path, snapshot)  # meta-batch (rank 0 writes), then report
        raise
    finally:
        bar.close()
    p = trainer.progress
    return interrupted, {"method": trainer.name, "meta_batches": p.meta_batch, "trajectories": p.trajectories,
                         "updates": p.updates, "skipped": p.skipped, "diverged": p.diverged,
                         "dropped": p.dropped,
                         "wall_s": round(p.wall, 2), "final_meta_loss": p.history[-1] if p.history else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from metatele.checkpoint import CheckpointError
    from metatele.meta.distributed import init_distributed

    try:  # configuration errors are the same on every rank: found before any process group exists
        cfg, methods = (None, None) if args.resume else build_config(args)
        device = args.device if args.device is not None else ("auto" if args.resume else cfg.train.device)
        ctx = init_distributed(device, args.backend)  # torchrun's RANK/WORLD_SIZE/...; no group when alone
    except ValueError as e:
        return _fail(str(e))
    rc = 1
    try:
        rc = _train(args, ctx, cfg, methods, CheckpointError)
        return rc
    finally:
        ctx.close(clean=rc in (0, 2))  # destroy_process_group, also on errors and Ctrl-C


def _train(args, ctx, cfg, methods, CheckpointError) -> int:
    from metatele.meta.distributed import make_trainer, resume_trainer

    say = print if ctx.is_main else (lambda *a, **k: None)  # rank 0 logs, rank 0 writes checkpoints
    jobs = []  # (trainer, path)
    try:
        if args.resume:
            for ck in args.resume:
                tr = resume_trainer(ck, ctx, trajectories=args.trajectories)
                jobs.append((tr, Path(ck)))
        else:
            out = Path(cfg.train.out)
            for m in methods:
                if m not in cfg.methods:
                    raise ValueError(f"method {m!r} has no [methods.{m}] table in the configuration")
                jobs.append((make_trainer(m, cfg, ctx), out / f"{m}.pt"))
    except CheckpointError as e:
        return _fail(str(e)) if ctx.is_main else 2
    except ValueError as e:
        return _fail(str(e)) if ctx.is_main else 2
    if ctx.distributed:
        say(f"data-parallel: {ctx.world_size} processes, backend {ctx.backend}, rank 0 on {ctx.device}")
    t0 = time.perf_counter()
    for tr, path in jobs:
        try:
            interrupted, summ = train_one(tr, path, not args.no_progress and ctx.is_main)
        except RuntimeError as e:
            if not ctx.distributed:
                raise
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"train_meta.py: error: rank {ctx.rank}: the data-parallel run failed ({msg})"
                  + (f"; saved {path} at the last completed meta-batch, continue with --resume {path}"
                     if ctx.is_main else ""), file=sys.stderr)
            return 1
        say(f"{summ['method']}: {summ['meta_batches']} meta-batches, {summ['trajectories']} trajectories, "
            f"{summ['updates']} meta-updates, {summ['skipped']} skipped (non-finite), {summ['diverged']} "
            f"diverged, {summ['dropped']} trajectories dropped, {summ['wall_s']} s, last meta-loss {summ['final_meta_loss']}; saved {path}")
        if interrupted:
            say(f"interrupted: saved {path} at meta-batch {summ['meta_batches']}; continue with "
                f"--resume {path}", file=sys.stderr)
            return 130
    say(f"total wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
