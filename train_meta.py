#!/usr/bin/env python
"""Meta-train P2's learned optimisers (P2 section 6; docs/meta_learning.md) and write one checkpoint per method.

    python train_meta.py                                  # configs/default.toml, all three methods
    python train_meta.py --config configs/paper.toml      # the paper's counts
    python train_meta.py --method lstm_lr_tele --trajectories 8 --steps 50 --batch 4
    python train_meta.py --resume checkpoints/lstm_update.pt
    torchrun --nproc_per_node=2 train_meta.py --batch 8   # data-parallel: 2 processes share each meta-batch

Checkpoints go to ``<out>/<method>.pt`` (``--out``, default ``train.out`` = ``checkpoints``), every
``train.save_every`` meta-batches, at the end, and on Ctrl-C or SIGTERM (the state at the last completed
meta-batch, so ``--resume`` continues exactly as an uninterrupted run would; further signals during that
save are ignored). The output folder is checked before any work, and a run holds a lock on each
checkpoint it writes, so a second run writing the same file is refused. ``--resume`` takes the run's own
configuration: only ``--trajectories`` (at least the progress made), ``--threads``, ``--device``,
``--backend`` and ``--no-progress`` may go with it. A non-finite meta-loss or meta-gradient skips that
meta-update (counted and printed at the end). Exit codes: 0 done, 2 bad configuration, checkpoint or
output folder, or a checkpoint locked by another run, 130 interrupted by Ctrl-C, 143 by SIGTERM (after
saving).
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
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


#: Flags that may go with --resume (the checkpoint's own configuration fixes everything else).
RESUME_FLAGS = ("--trajectories", "--threads", "--device", "--backend", "--no-progress")


def check_args(args) -> None:
    """Argument errors that need no configuration: ``ValueError`` naming the flag."""
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads} must be >= 0 (0: torch's default)")
    for flag, vals, key in (("--method", args.method, str), ("--resume", args.resume,
                                                                lambda v: str(Path(v).resolve()))):
        seen = set()
        for v in vals or ():
            if key(v) in seen:
                raise ValueError(f"{flag} {v!r} is given twice")
            seen.add(key(v))
    if args.resume:
        given = [f"--{k}" for k in ("config", "method", "steps", "unroll", "batch", "seed", "out")
                 if getattr(args, k) is not None]
        if given:
            raise ValueError(f"--resume continues a run with the configuration saved in its checkpoint, so "
                             f"{', '.join(given)} cannot go with it; allowed with --resume: "
                             f"{', '.join(RESUME_FLAGS)}")


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM both become ``KeyboardInterrupt``; :meth:`deferred` holds them back
    while a checkpoint is written, so that a second signal cannot abort the save."""

    def __init__(self):
        self.received: list[int] = []
        self.installed: dict[int, object] = {}

    def _raise(self, signum, frame):
        self.received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.installed = {s: signal.signal(s, self._raise) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for s, h in self.installed.items():
            signal.signal(s, h)
        self.installed = {}

    def _ignore(self, signum, frame):
        self.received.append(signum)

    @contextmanager
    def deferred(self, reraise: bool = True):
        """Signals arriving in the block are remembered; with ``reraise`` the first is raised as
        ``KeyboardInterrupt`` once the block is done. Without, the run is stopping: they are dropped, and
        so are later ones until :meth:`restore` (when :meth:`install` was called)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        pending: list[int] = []

        def hold(signum, frame):
            pending.append(signum)
            if len(pending) == 1:
                print(f"train_meta.py: signal {signal.Signals(signum).name} received while saving a checkpoint: "
                      "finishing the save first", file=sys.stderr)

        old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h if reraise or not self.installed else self._ignore)
        if pending:
            self.received.extend(pending)
            if reraise:
                raise KeyboardInterrupt(f"signal {pending[0]}")

    @property
    def name(self) -> str:
        return "SIGTERM" if signal.SIGTERM in self.received else "Ctrl-C"

    @property
    def exit_code(self) -> int:
        return 143 if signal.SIGTERM in self.received else 130


SIGNALS = _Signals()


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
    snapshot = None  # None: the trainer itself is at a completed meta-batch
    saved = False    # the checkpoint holds the trainer's current state
    interrupted = False
    try:
        while trainer.progress.meta_batch < total:
            snapshot = trainer.payload()
            saved = False
            r = trainer.run_meta_batch()
            snapshot = None
            m = r["meta_loss"]
            if math.isfinite(m):
                ema = m if ema is None else 0.9 * ema + 0.1 * m
            bar.set_postfix(meta_loss=f"{ema:.4g}" if ema is not None else "nan",
                            skipped=trainer.progress.skipped)
            bar.update(1)
            if trainer.progress.meta_batch % trainer.cfg.train.save_every == 0:
                with SIGNALS.deferred():  # a signal here is answered after the save
                    trainer.save(path)
                    saved = True
        if not saved:
            with SIGNALS.deferred():
                trainer.save(path)
                saved = True
    except KeyboardInterrupt:
        interrupted = True
        if not saved:
            with SIGNALS.deferred(reraise=False):  # a second Ctrl-C / SIGTERM cannot abort this save
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
    try:
        check_args(args)
    except ValueError as e:
        return _fail(str(e))
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
    SIGNALS.received.clear()
    if not ctx.distributed:  # under torchrun init_distributed turns SIGTERM into KeyboardInterrupt
        SIGNALS.install()
    try:
        rc = _locked(args, ctx, cfg, methods, CheckpointError)
        return rc
    except KeyboardInterrupt:  # outside a method's training (loading, between methods): nothing to save
        print(f"train_meta.py: interrupted ({SIGNALS.name})", file=sys.stderr)
        rc = SIGNALS.exit_code
        return rc
    finally:
        SIGNALS.restore()
        ctx.close(clean=rc in (0, 2))  # destroy_process_group, also on errors and Ctrl-C


def _locked(args, ctx, cfg, methods, CheckpointError) -> int:
    """Check the output folder and lock every checkpoint this run writes (rank 0, which writes them),
    then train; the locks are released on every way out."""
    from metatele.checkpoint import CheckpointLock, CheckpointMissing, check_output_dir, clean_stale_temps

    locks, err = [], None
    if ctx.is_main:
        try:
            if args.resume:
                paths = [Path(ck) for ck in args.resume]
                for p in paths:
                    if not p.exists():
                        raise CheckpointMissing(f"checkpoint {str(p)!r} does not exist")
                    check_output_dir(p.parent, "checkpoint folder")
            else:
                out = check_output_dir(cfg.train.out, "--out" if args.out is not None else "train.out")
                paths = [out / f"{m}.pt" for m in methods]
            for p in paths:
                locks.append(CheckpointLock(p).acquire())
                clean_stale_temps(p.parent)  # temporary files of runs killed during a save
        except (ValueError, OSError, CheckpointError) as e:
            err = str(e)
    if ctx.distributed:  # every rank stops if rank 0 cannot write
        err = ctx.broadcast_object(err)
    try:
        if err is not None:
            return _fail(err) if ctx.is_main else 2
        return _train(args, ctx, cfg, methods, CheckpointError)
    finally:
        for lock in locks:
            lock.release()


def _train(args, ctx, cfg, methods, CheckpointError) -> int:
    from metatele.meta.distributed import make_trainer, resume_trainer

    say = print if ctx.is_main else (lambda *a, **k: None)  # rank 0 logs, rank 0 writes checkpoints
    jobs = []  # (trainer, path)
    try:
        if args.resume:
            for ck in args.resume:
                tr = resume_trainer(ck, ctx, trajectories=args.trajectories)
                done = tr.progress.trajectories
                if args.trajectories is not None and args.trajectories < done:
                    raise ValueError(f"--trajectories {args.trajectories} is below the {done} trajectories "
                                     f"{ck} has already trained; give at least {done}")
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
    for tr, _ in jobs:
        B, n = tr.batch, tr.counts.trajectories  # this method's meta-batch
        if n % B:
            say(f"note: {tr.name}: {n} trajectories is not a whole number of meta-batches of {B}; "
                f"trains {tr.n_meta_batches * B} ({tr.n_meta_batches} meta-batch(es))")
    from metatele.devices import cpu_threads

    t0 = time.perf_counter()
    for tr, path in jobs:
        try:  # --threads, else the method's own methods.<name>.threads, else torch's default
            with cpu_threads(0 if args.threads else tr.cfg.threads_of(tr.name)):
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
            say(f"interrupted ({SIGNALS.name}): saved {path} at meta-batch {summ['meta_batches']}; continue "
                f"with --resume {path}", file=sys.stderr)
            return SIGNALS.exit_code
    say(f"total wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
