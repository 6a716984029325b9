"""Data-parallel meta-training on PyTorch's own distributed engine (``torch.distributed``).

Launch with ``torchrun`` (one process per rank; several machines through torchrun's rendezvous flags)::

    torchrun --nproc_per_node=2 train_meta.py --method lstm_update --batch 32
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=HOST --master_port=29500 train_meta.py ...

What every rank does, and why the result equals one process
-----------------------------------------------------------
* ``train.batch`` = ``B`` is the number of initialisations in one *global* meta-batch, whatever the number
  of ranks ``N``. Meta-batch ``i`` uses the training seeds with indices ``seed_offset + i B ... + B - 1``
  (exactly those a single process uses); rank ``r`` unrolls the contiguous share
  ``[lo_r, hi_r) = [floor(r B / N), floor((r + 1) B / N))`` of them (:func:`shard`). The shares are
  disjoint and their union is the meta-batch: no trajectory is duplicated or skipped. ``N > B`` is an error.
* The meta-loss of a window is a *mean* over the trajectories a process unrolls. Rank ``r`` therefore
  scales its meta-gradient by ``b_r / B`` (``b_r = hi_r - lo_r``) and the ranks *sum* them with one
  ``all_reduce``: ``sum_r (b_r / B) grad mean_{j in r} l_j = grad mean_{j <= B} l_j``, the meta-gradient of
  one process with ``B`` trajectories (also with unequal shares). Every rank then runs the same clipping
  and Adam step on the same averaged gradient, so the meta-parameters stay identical (the initial ones are
  broadcast from rank 0).
* The data-dependent decisions are collective too, so that every rank takes the branch one process with
  all ``B`` trajectories would take and none waits in a collective the others skipped: an inner loss
  going non-finite on any rank stops the window at that step on every rank (the meta-loss keeps the
  finite terms before it; each rank unrolls to its own stop, then one ``all_reduce`` of the stop step
  and a rewind, :func:`~metatele.meta.unroll.run_window`); a non-finite meta-loss on any rank
  puts NaN into the summed gradient and every rank skips that meta-update; inner weights going non-finite
  on any rank abandon the meta-batch on every rank; the logged meta-loss is the ``b_r / B`` weighted sum
  of the ranks' values (the one-process mean).
* Progress is global (meta-batches and trajectories of the whole world), so a checkpoint (written by rank 0
  only) resumes on any number of ranks: meta-batch ``i`` has the same seeds for every ``N``.

Why an explicit ``all_reduce`` and not ``DistributedDataParallel``: DDP synchronises gradients from hooks
on one forward/backward pair of a wrapped module; here the meta-optimiser is called ``K`` times (through
``higher``'s functional patching) inside one truncation window before a single ``backward()``, some
parameters receive no gradient in some windows, and the skip-if-non-finite decision must be collective.
One flattened ``all_reduce`` per window (:meth:`DistContext.average_gradients`) between ``backward()`` and
the Adam step (the trainer's ``grad_hook``) is exact, as cheap as DDP's buckets for a few MB of LSTM
weights, and keeps ``higher`` untouched.
"""
from __future__ import annotations

import datetime
import gc
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from .. import checkpoint as ckm
from ..devices import env_world, resolve_device, shard
from ..learned.loading import checkpoint_config
from .trainer import MetaTrainer

__all__ = ["shard", "resolve_device", "resolve_backend", "env_world", "DistContext", "init_distributed",
           "distributed", "trainer_hooks", "make_trainer", "resume_trainer", "BACKENDS"]

BACKENDS = ("auto", "gloo", "nccl", "mpi", "ucc")


# ---------------------------------------------------------------------------- pure helpers
def resolve_backend(spec: str | None, device: torch.device) -> str:
    """``auto``: ``nccl`` for a CUDA device (when built with NCCL), else ``gloo``; or the named backend."""
    s = "auto" if spec is None else str(spec).strip().lower()
    if s not in BACKENDS:
        raise ValueError(f"backend {spec!r}; allowed: {list(BACKENDS)}")
    if s == "auto":
        return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if s == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA tensors but the device is {device}: use --backend gloo "
                         f"(or auto) on CPU")
    avail = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
             "mpi": dist.is_mpi_available(), "ucc": getattr(dist, "is_ucc_available", lambda: False)()}
    if not avail[s]:
        raise ValueError(f"backend {s!r} is not available in this PyTorch build; available: "
                         f"{[k for k, v in avail.items() if v]}")
    return s


# ---------------------------------------------------------------------------- the process group
@dataclass
class DistContext:
    """This process's place in the world and the collectives meta-training needs.

    With ``world_size == 1`` every method is a no-op returning its input (no process group exists)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False
    _old_sigterm: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and progress bars."""
        return self.rank == 0

    # -- collectives
    def average_gradients(self, params: Sequence[torch.Tensor], weight: float) -> None:
        """``p.grad <- sum_ranks weight_r p.grad_r`` for every parameter, in one ``all_reduce`` per dtype.

        A parameter without a gradient counts as zero; it keeps ``grad = None`` only when it has none on
        every rank (so Adam skips it exactly as in one process)."""
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            parts, has = [], []
            for i in idx:
                p = params[i]
                g = p.grad
                has.append(0.0 if g is None else 1.0)
                parts.append(torch.zeros(p.numel(), dtype=dtype, device=p.device) if g is None
                             else g.detach().reshape(-1).to(dtype) * weight)
            dev = params[idx[0]].device
            buf = torch.cat(parts + [torch.tensor(has, dtype=dtype, device=dev)])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            off = 0
            for i in idx:
                p = params[i]
                n = p.numel()
                chunk = buf[off:off + n].view_as(p)
                off += n
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
            flags = buf[off:].tolist()  # one device-to-host copy
            for k, i in enumerate(idx):
                if flags[k] == 0.0:
                    params[i].grad = None

    def sync_window(self, meta_loss: float, stop: bool, weight: float) -> tuple[float, bool]:
        """``(sum_r weight_r meta_loss_r, any_r stop_r)`` over the ranks (one small ``all_reduce``)."""
        if not self.distributed:
            return meta_loss, stop
        t = torch.tensor([meta_loss * weight, 1.0 if stop else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[0]), bool(t[1] > 0)

    def min_int(self, x: int) -> int:
        """The minimum of ``x`` over the ranks (one small ``all_reduce``)."""
        if not self.distributed:
            return int(x)
        t = torch.tensor([int(x)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t[0])

    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=src)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def in_sync(self, module: torch.nn.Module) -> bool:
        """True if every rank holds bit-identical parameters (elementwise max == min across ranks)."""
        if not self.distributed:
            return True
        flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return bool(torch.equal(hi, lo))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- teardown
    def close(self, clean: bool = True) -> None:
        """Destroy the process group this context created (idempotent; also after errors).

        clean: every rank got here without error, so a barrier first lets the last collectives finish on
        all ranks before any of them tears its connections down (gloo otherwise may abort a peer that is
        still completing one at exit); after an error (a peer may be gone) the group is destroyed at once."""
        if self._old_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            except (ValueError, OSError):
                pass
            self._old_sigterm = None
        if self.owns_group and dist.is_available() and dist.is_initialized():
            if clean:
                try:
                    dist.barrier()
                except Exception:  # a peer already gone: tear down anyway
                    pass
            try:
                dist.destroy_process_group()
            except Exception as e:  # a peer already gone: nothing left to tear down cleanly
                if clean:
                    print(f"metatele.distributed: rank {self.rank}: destroy_process_group failed: "
                          f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}", file=sys.stderr)
            # A ProcessGroupGloo still reachable through a reference cycle would otherwise be freed by the
            # garbage collection of interpreter shutdown, while its worker threads still need the GIL:
            # std::terminate ("terminate called without an active exception", seen here about once in 20
            # two-process runs). Collect now, while the interpreter is alive.
            gc.collect()
        self.owns_group = False


def _sigterm_to_keyboard_interrupt(signum, frame):
    # torchrun stops its workers with SIGTERM (after Ctrl-C or a failed peer): turn it into the
    # KeyboardInterrupt that train_meta.py answers by saving the last completed meta-batch on rank 0.
    raise KeyboardInterrupt(f"signal {signum}")


def init_distributed(device: str | torch.device | None = "auto", backend: str | None = "auto", *,
                     timeout_s: float = 1800.0, environ: dict[str, str] | None = None) -> DistContext:
    """Set up this process from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). Without them (or with WORLD_SIZE=1) no process group is created.

    device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (see :func:`resolve_device`); backend: ``auto``
    (``nccl`` on GPU, ``gloo`` on CPU) or a named one. Call :meth:`DistContext.close` when done (or use
    :func:`distributed`)."""
    env = os.environ if environ is None else environ
    rank, world, local = env_world(env)
    dev = resolve_device(device, local_rank=local)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return ctx
    be = resolve_backend(backend, dev)
    ctx.backend = be
    if dist.is_initialized():  # the caller built the group: use it, leave its teardown to the caller
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ValueError(f"a process group of world size {dist.get_world_size()} (rank {dist.get_rank()}) "
                             f"exists, but the environment says WORLD_SIZE={world}, RANK={rank}")
        return ctx
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {missing} not set: launch with torchrun, or export "
                         f"MASTER_ADDR and MASTER_PORT")
    kw: dict[str, Any] = {}
    if be == "nccl":
        kw["device_id"] = dev
    dist.init_process_group(be, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kw)
    ctx.owns_group = True
    if threading.current_thread() is threading.main_thread():
        ctx._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_keyboard_interrupt)
    return ctx


@contextmanager
def distributed(device: str | torch.device | None = "auto", backend: str | None = "auto",
                **kwargs) -> Iterator[DistContext]:
    """``with distributed(...) as ctx:`` — :func:`init_distributed` with teardown also on errors/Ctrl-C."""
    ctx = init_distributed(device, backend, **kwargs)
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        ctx.close(clean=ok)


# ---------------------------------------------------------------------------- trainers
def trainer_hooks(ctx: DistContext, batch: int) -> dict[str, Any]:
    """The constructor hooks of a :class:`~metatele.meta.MetaTrainer` in this world (none when alone):
    meta-gradient averaging (``grad_hook``) and the collective decisions (``window_hook`` at the end of a
    window, ``stop_hook`` inside it: a window stops where one process would stop). ``batch``: the global
    meta-batch, shared by the ranks with :func:`~metatele.devices.shard`."""
    if not ctx.distributed:
        return {}
    lo, hi = shard(batch, ctx.rank, ctx.world_size)
    weight = (hi - lo) / batch

    def grad_hook(params):
        ctx.average_gradients(params, weight)

    def window_hook(meta_loss: float, stop: bool) -> tuple[float, bool]:
        return ctx.sync_window(meta_loss, stop, weight)

    return {"grad_hook": grad_hook, "window_hook": window_hook, "stop_hook": ctx.min_int}


def make_trainer(method_name: str, cfg, ctx: DistContext, **kwargs):
    """A fresh :class:`~metatele.meta.MetaTrainer` for this rank, on ``ctx.device``, wired to ``ctx``, with
    rank 0's meta-parameters on every rank."""
    tr = MetaTrainer(method_name, cfg, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                     **trainer_hooks(ctx, cfg.batch_of(method_name)), **kwargs)
    if ctx.distributed:
        ctx.broadcast_module(tr.method)
    return tr


def resume_trainer(path, ctx: DistContext, *, trajectories: int | None = None, **kwargs):
    """Continue the run saved in ``path`` on this world (any number of ranks, any device).

    Rank 0 reads the checkpoint (``map_location='cpu'``) and broadcasts it, so the other ranks (on other
    machines too) need no copy of the file; a checkpoint error is raised on every rank."""
    ck, err = None, None
    if ctx.is_main:
        try:
            ck = ckm.load_checkpoint(path)
        except ckm.CheckpointError as e:
            err = (type(e).__name__, str(e))
    ck, err = ctx.broadcast_object((ck, err))
    if err is not None:
        raise getattr(ckm, err[0], ckm.CheckpointError)(err[1])
    cfg = checkpoint_config(ck, path)
    return MetaTrainer.resume(ck, trajectories=trajectories, rank=ctx.rank, world_size=ctx.world_size,
                              device=ctx.device, **trainer_hooks(ctx, cfg.batch_of(ck["method"])), **kwargs)
