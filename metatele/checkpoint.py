"""Versioned, atomic checkpoints of meta-optimisers.

A checkpoint is one ``torch.save`` file holding a dict::

    format "metatele-meta-checkpoint", version, method, arch (shapes the weights must match), dims,
    config (the full configuration as a dict), meta_params (state_dict), meta_optim (Adam state),
    progress (meta-step, trajectories, skipped updates, history), rng, versions (python, torch, higher,
    metatele)

Writes are atomic: the file is written to a temporary file in the same folder, flushed, fsynced and
moved over the target with ``os.replace``, so a crash leaves either the old or the new checkpoint, never
half of one. Loads use ``torch.load(weights_only=True)`` (no arbitrary code) and fail with a typed
:class:`CheckpointError` that entry points print as one line (exit code 2).
"""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "VERSION", "CheckpointError", "CheckpointMissing", "CheckpointCorrupt",
           "CheckpointMismatch", "ProblemMismatch", "save_checkpoint", "load_checkpoint",
           "check_arch", "library_versions"]

FORMAT = "metatele-meta-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "method", "arch", "dims", "config", "meta_params", "progress")


class CheckpointError(Exception):
    """Base class: a checkpoint that cannot be used. ``str(e)`` is a one-line message naming the file."""


class CheckpointMissing(CheckpointError):
    """The file does not exist."""


class CheckpointCorrupt(CheckpointError):
    """The file exists but is not a readable metatele checkpoint (truncated, garbage, wrong format)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint's architecture differs from the one it is loaded into."""


class ProblemMismatch(CheckpointMismatch):
    """The checkpoint was trained for another problem size (weight shapes)."""


def library_versions() -> dict[str, str]:
    import higher

    try:
        from importlib.metadata import version
        mt = version("metatele")
    except Exception:  # not installed: running from the source tree
        mt = "source"
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "higher": str(getattr(higher, "__version__", "unknown")), "metatele": str(mt)}


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus format, version and library versions) to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data["format"], data["version"] = FORMAT, VERSION
    data.setdefault("versions", library_versions())
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return p


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint; raises :class:`CheckpointMissing` or :class:`CheckpointCorrupt`."""
    p = Path(path)
    if not p.exists():
        raise CheckpointMissing(f"checkpoint {str(p)!r} does not exist")
    if not p.is_file():
        raise CheckpointCorrupt(f"checkpoint {str(p)!r} is not a file")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickle with forbidden globals, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointCorrupt(f"checkpoint {str(p)!r} is corrupt or not a torch file ({msg[:120]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointCorrupt(f"checkpoint {str(p)!r} is not a metatele meta-optimiser checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointCorrupt(f"checkpoint {str(p)!r} has format version {data.get('version')!r}; "
                                f"this metatele reads version {VERSION}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointCorrupt(f"checkpoint {str(p)!r} lacks the field(s) {missing}")
    return data


def check_arch(ckpt: dict[str, Any], arch: dict[str, Any], path: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatch` (or :class:`ProblemMismatch` for weight shapes) if the
    checkpoint's architecture description differs from ``arch`` (see ``LearnedMethod.arch``)."""
    a = ckpt["arch"]
    if a.get("method") != arch.get("method"):
        raise CheckpointMismatch(f"{path} holds method {a.get('method')!r}, expected {arch.get('method')!r}")
    if a.get("shapes") != arch.get("shapes"):
        raise ProblemMismatch(f"{path} was trained for weight shapes {a.get('shapes')}, "
                              f"not {arch.get('shapes')}")
    if a.get("param_shapes") != arch.get("param_shapes"):
        diff = sorted(k for k in set(a.get("param_shapes", {})) | set(arch.get("param_shapes", {}))
                      if a.get("param_shapes", {}).get(k) != arch.get("param_shapes", {}).get(k))
        raise CheckpointMismatch(f"{path} has another meta-optimiser architecture (differs in {diff[:3]})")
