"""Where a process runs: its device and its share of a meta-batch (pure helpers, no ``torch.distributed``).

Used by the meta-trainer, the evaluation and the data-parallel layer (:mod:`metatele.meta.distributed`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["shard", "env_world", "resolve_device", "cpu_threads"]


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (0: leave the count as it is), then restore the count."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share ``[lo, hi)`` of ``n`` items for ``rank`` of ``world_size`` (sizes differ by <= 1).

    Raises ``ValueError`` when ``world_size > n`` (a rank would have no trajectory to unroll)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 1:
        raise ValueError(f"need at least one item to share, got n={n}")
    if world_size > n:
        raise ValueError(f"world size {world_size} is larger than the {n} trajectories of a meta-batch "
                         f"(train.batch = {n}): use --batch >= {world_size} or fewer processes")
    return rank * n // world_size, (rank + 1) * n // world_size


def env_world(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` when absent)."""
    env = os.environ if environ is None else environ

    def get(name: str, default: int) -> int:
        v = env.get(name)
        if v is None or v == "":
            return default
        try:
            return int(v)
        except ValueError:
            raise ValueError(f"environment variable {name}={v!r} is not an integer") from None

    world = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    local = get("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    if local < 0:
        raise ValueError(f"LOCAL_RANK={local} must be >= 0")
    return rank, world, local


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device of this process for ``spec`` in ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or
    ``cuda:N``. ``cuda`` without an index means ``cuda:LOCAL_RANK`` (one GPU per rank on a machine;
    ``local_rank`` default: the ``LOCAL_RANK`` environment variable, 0 when absent)."""
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f"device {spec!r} must be a string: auto, cpu, cuda or cuda:N")
    s = spec.strip().lower()
    if s == "auto":
        s = "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine "
                             f"(torch.cuda.is_available() is False); use --device cpu or auto")
        count = torch.cuda.device_count()
        if s == "cuda":
            if local_rank is None:
                local_rank = env_world()[2]
            idx = local_rank
            if idx >= count:
                raise ValueError(f"device 'cuda' for LOCAL_RANK={idx}, but this machine has {count} GPU(s): "
                                 f"start at most {count} processes per machine (--nproc_per_node)")
        else:
            try:
                idx = int(s.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"device {spec!r}: the GPU index must be an integer (cuda:0)") from None
            if not 0 <= idx < count:
                raise ValueError(f"device {spec!r}: this machine has {count} GPU(s) (cuda:0 .. cuda:{count - 1})")
        return torch.device("cuda", idx)
    raise ValueError(f"device {spec!r}; allowed: auto, cpu, cuda, cuda:N")
