"""From a configuration or a checkpoint to a working :class:`~metatele.learned.LearnedMethod`: the one
path used by meta-training (fresh and resumed runs), evaluation and
:meth:`~metatele.learned.LearnedOptimizer.from_checkpoint`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointMismatch, ProblemMismatch, check_arch, load_checkpoint
from ..config import Config, config_from_dict
from .methods import LearnedMethod, weight_shapes

__all__ = ["DTYPES", "build_method", "checkpoint_config", "load_method"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_method(name: str, cfg: Config, *, seed: int | None = None) -> LearnedMethod:
    """Construct the LSTMs of ``name`` for ``cfg.problem.dims`` with parameters drawn from ``seed``
    (default ``cfg.train.seed``) without touching the global RNG of the caller."""
    seed = cfg.train.seed if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = LearnedMethod(name, weight_shapes(cfg.problem.dims), cfg.lstm, cfg.teleport_of(name))
    return m.to(DTYPES[cfg.problem.dtype])


def checkpoint_config(ck: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    """The validated configuration stored in a loaded checkpoint (``CheckpointMismatch`` if unusable)."""
    try:
        cfg = config_from_dict(ck["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointMismatch(f"{path} holds an unusable configuration: {e}") from None
    if list(cfg.problem.dims) != list(ck["dims"]):
        raise ProblemMismatch(f"{path}: configuration dims {cfg.problem.dims} differ from the stored "
                              f"dims {list(ck['dims'])}")
    return cfg


def load_method(path: str | Path | dict[str, Any]) -> tuple[LearnedMethod, Config, dict[str, Any]]:
    """Rebuild the trained method of a checkpoint (a path, or a checkpoint dict already loaded) in eval
    mode, with its selected meta-parameters where the run kept them (``train.select_every``), else its
    final ones. Returns ``(method, config, checkpoint)``; typed :mod:`metatele.checkpoint` errors."""
    ck = path if isinstance(path, dict) else load_checkpoint(path)
    where = "checkpoint" if isinstance(path, dict) else str(path)
    cfg = checkpoint_config(ck, where)
    method = build_method(ck["method"], cfg)
    check_arch(ck, method.arch(), where)
    params = ck["best"]["meta_params"] if ck.get("best") else ck["meta_params"]
    try:
        method.load_state_dict(params)
    except (RuntimeError, KeyError) as e:
        raise CheckpointMismatch(f"{where} does not fit its meta-optimiser: {str(e).splitlines()[0][:150]}") from None
    method.eval()
    return method, cfg, ck
