#!/usr/bin/env python
"""Data-parallel meta-training speed (metatele.meta.distributed) at the paper's sizes (docs/meta_learning.md, section 8).

For each method (paper architecture from configs/paper.toml: UpdateLSTM 800-300-800, TeleportLSTM hidden
300, LrTeleportLSTM hidden 20; problem dims [20, 20, 20, 20]; unroll 10) and each *global* meta-batch of B
initialisations it starts 1 and 2 processes exactly as torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, MASTER_PORT; gloo on CPU), one thread each (OMP_NUM_THREADS=1,
torch.set_num_threads(1)); every rank unrolls its B/N share, meta-gradients are all-reduced per window.
After one warm-up window it times ``--steps`` inner steps (forward, backward, all-reduce, Adam) and
prints inner steps per second (trajectory-steps of the whole world: B x steps / seconds, timed on rank 0,
whose windows end in collectives with the other ranks) and the ratios of 2 processes to 1 process: with the
same global batch (strong scaling: B=32 is 16 per rank) and with one rank's share (weak scaling: 2
processes x 16 against 1 process x 16). Beside wall-clock it reports the CPU seconds of the busiest rank
(time in collectives costs none) and the load average, since a shared machine distorts wall-clock.

With ``--gpu`` (default: when CUDA is available) the same run also times one process on the GPU for
``--gpu-batches`` (default 1 and 32), beside the CPU rows.

    python benchmarks/meta_distributed.py [--batches 1 2 16 32] [--procs 1 2] [--steps 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lstm_update_tele", "lstm_update", "lstm_lr_tele")


def worker(method: str, batch: int, steps: int, device: str) -> None:
    """One rank (environment set by the launcher)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from metatele.config import load_config
    from metatele.meta.distributed import distributed, make_trainer

    cfg = load_config(ROOT / "configs" / "paper.toml")
    K = cfg.meta.unroll
    if steps % K:
        raise SystemExit(f"--steps {steps} must be a multiple of the unroll {K}")
    cfg.train.batch = batch
    cfg.methods[method].steps = steps + K  # the first window is the warm-up
    cfg.methods[method].trajectories = batch  # one meta-batch
    with distributed(device, "auto") as ctx:
        tr = make_trainer(method, cfg, ctx)
        ctx.barrier()
        times, cpu = [], []

        def mark(_info):
            if tr.device.type == "cuda":
                torch.cuda.synchronize(tr.device)
            times.append(time.perf_counter())
            cpu.append(time.process_time())

        tr.run_meta_batch(on_window=mark)
        assert ctx.in_sync(tr.method), "meta-parameters differ across ranks"
        dt = times[-1] - times[0]
        # CPU seconds of the busiest rank (waiting in a collective costs none): the speed the world would
        # have with a dedicated core per process, a check on wall-clock figures from a shared machine
        cpu_max = cpu[-1] - cpu[0]
        if ctx.distributed:
            t = torch.tensor([cpu_max], dtype=torch.float64, device=ctx.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            cpu_max = float(t)
        if ctx.is_main:
            print(json.dumps({
                "method": method, "batch": batch, "processes": ctx.world_size, "device": str(tr.device),
                "backend": ctx.backend, "per_rank": len(tr.seeds_for(0)), "inner_steps": steps,
                "seconds": dt, "inner_steps_per_s": batch * steps / dt, "meta_updates_per_s": (len(times) - 1) / dt,
                "cpu_seconds_busiest_rank": cpu_max, "inner_steps_per_cpu_s": batch * steps / cpu_max,
                "load_avg_1min": os.getloadavg()[0],
                "peak_rss_mb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads_per_process": torch.get_num_threads(),
                "peak_gpu_mb": (torch.cuda.max_memory_allocated(tr.device) / 2**20
                                if tr.device.type == "cuda" else None)}), flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, batch: int, steps: int, procs: int, device: str, timeout: float) -> dict:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ps = [subprocess.Popen([sys.executable, __file__, "--worker", method, str(batch), "--steps", str(steps),
                            "--device", device], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
          for r in range(procs)]
    outs = []
    try:
        for p in ps:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
    for r, (p, (o, e)) in enumerate(zip(ps, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {r} of {procs} ({method}, batch {batch}) failed:\n{e[-2000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 16, 32],
                    help="global initialisations per meta-batch (runs with more processes than B are left out)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (CPU, gloo)")
    ap.add_argument("--steps", type=int, default=20, help="timed inner steps (multiple of the unroll 10)")
    ap.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                    help="also time one process on the GPU (auto: when CUDA is available)")
    ap.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), a.steps, a.device)
        return 0
    import torch

    if any(b < 1 for b in a.batches) or any(n < 1 for n in a.procs):
        print(f"meta_distributed.py: error: batches {a.batches} and procs {a.procs} must be >= 1", file=sys.stderr)
        return 2
    use_gpu = a.gpu == "yes" or (a.gpu == "auto" and torch.cuda.is_available())
    if a.gpu == "yes" and not torch.cuda.is_available():
        print("meta_distributed.py: error: --gpu yes but CUDA is not available", file=sys.stderr)
        return 2
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, one thread per process; "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none available'}")
    print("x same B: against 1 process with the same global batch (strong scaling); x same share: against 1 "
          "process with one rank's share (weak scaling); cpu: from the CPU seconds of the busiest rank")
    print(f"{'method':<18}{'device':>7}{'B':>4}{'procs':>6}{'per rank':>9}{'inner steps/s':>14}{'x same B':>9}"
          f"{'x same share':>13}{'steps/cpu-s':>12}{'x same B (cpu)':>15}{'load':>6}{'RSS MB':>7}", flush=True)

    def ratio(r, base, key):
        return r[key] / base[key] if base else None

    def fmt(x, w):
        return f"{x:>{w}.2f}" if x is not None else f"{'-':>{w}}"

    rows = []
    for m in a.methods:
        res: dict[tuple[int, int], dict] = {}
        for b in sorted(set(a.batches)):
            for n in sorted(set(a.procs)):
                if n > b:
                    continue  # a rank would have no trajectory
                r = launch(m, b, a.steps, n, "cpu", a.timeout)
                res[(b, n)] = r
                same_b = res.get((b, 1))
                share = res.get((b // n, 1)) if b % n == 0 else None
                r["x_same_batch"] = ratio(r, same_b, "inner_steps_per_s")
                r["x_same_share"] = ratio(r, share, "inner_steps_per_s")
                r["x_same_batch_cpu"] = ratio(r, same_b, "inner_steps_per_cpu_s")
                rows.append(r)
                print(f"{m:<18}{'cpu':>7}{b:>4}{n:>6}{r['per_rank']:>9}{r['inner_steps_per_s']:>14.1f}"
                      f"{fmt(r['x_same_batch'], 9)}{fmt(r['x_same_share'], 13)}{r['inner_steps_per_cpu_s']:>12.1f}"
                      f"{fmt(r['x_same_batch_cpu'], 15)}{r['load_avg_1min']:>6.1f}{r['peak_rss_mb_rank0']:>7.0f}",
                      flush=True)
        if use_gpu:
            for b in a.gpu_batches:
                r = launch(m, b, a.steps, 1, "cuda", a.timeout)
                rows.append(r)
                print(f"{m:<18}{'cuda':>7}{b:>4}{1:>6}{b:>9}{r['inner_steps_per_s']:>14.1f}{'-':>9}{'-':>13}"
                      f"{'-':>12}{'-':>15}{r['load_avg_1min']:>6.1f}{r['peak_rss_mb_rank0']:>7.0f}  peak GPU "
                      f"{r['peak_gpu_mb']:.0f} MB", flush=True)
    if not use_gpu:
        print("no GPU available: GPU figures not measured")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
