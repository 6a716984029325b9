"""Versioned, atomic checkpoints of meta-optimisers.

A checkpoint is one ``torch.save`` file holding a dict::

    format "metatele-meta-checkpoint", version, method, arch (shapes the weights must match), dims,
    config (the full configuration as a dict), meta_params (state_dict), meta_optim (Adam state),
    progress (meta-step, trajectories, skipped updates, history), rng, versions (python, torch, higher,
    metatele)

Writes are atomic: the file is written to a temporary file ``.<name>.<pid>.<random>.tmp`` in the same
folder, flushed, fsynced and moved over the target with ``os.replace``, so a crash leaves either the old or
the new checkpoint, never half of one. A process killed during a write (``kill -9``) leaves its temporary
file; :func:`clean_stale_temps` (called by every save) removes those of dead processes. Loads use
``torch.load(weights_only=True)`` (no arbitrary code), check the fields' types and that the
meta-parameters are finite, and fail with a typed :class:`CheckpointError` that entry points print as one
line (exit code 2).

A run that writes a checkpoint holds :class:`CheckpointLock` on it for its whole life, so a second run
writing the same file is refused (:class:`CheckpointLocked`); :func:`check_output_dir` checks an output
folder before any work is done.
"""
from __future__ import annotations

import errno
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "VERSION", "CheckpointError", "CheckpointMissing", "CheckpointCorrupt",
           "CheckpointMismatch", "ProblemMismatch", "save_checkpoint", "load_checkpoint",
           "check_arch", "library_versions", "CheckpointLocked", "CheckpointLock",
           "check_output_dir", "clean_stale_temps", "pid_alive"]

FORMAT = "metatele-meta-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "method", "arch", "dims", "config", "meta_params", "progress")
#: Fields of ``progress`` (``metatele.meta.trainer.Progress``); the first two are required.
PROGRESS_FIELDS = ("meta_batch", "trajectories", "windows", "updates", "skipped", "diverged", "dropped", "wall",
                   "history")
#: A temporary file whose writer is unknown (no PID in its name) is stale after this many seconds.
STALE_TEMP_S = 600.0
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


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


class CheckpointLocked(CheckpointError):
    """Another running process is writing this checkpoint."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Make sure ``path`` is (or can be created as) a writable folder: create it and write and remove a
    probe file. Raises ``ValueError`` naming ``flag`` and the path otherwise (a file, an unwritable place)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".metatele-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {str(p)!r} is not a writable folder "
                         f"({e.strerror or type(e).__name__})") from None
    return p


def clean_stale_temps(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove the temporary files ``.<name>.<pid>.<random>.tmp`` that :func:`save_checkpoint` left in
    ``folder`` when its process was killed during a write: those whose process is dead, and those without
    a PID (older metatele) older than :data:`STALE_TEMP_S`. Returns the removed paths."""
    d = Path(folder)
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    for n in names:
        if not (n.startswith(".") and n.endswith(".tmp")) or n.startswith(".metatele-probe."):
            continue
        f = d / n
        m = _TEMP.match(n)
        try:
            if m is not None:
                stale = int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))
            else:
                stale = ".pt." in n and now - f.stat().st_mtime > STALE_TEMP_S
            if stale:
                f.unlink()
                removed.append(f)
        except OSError:  # removed meanwhile, or not ours to remove
            pass
    return removed


class CheckpointLock:
    """Exclusive right to write checkpoint ``path`` for the life of a run.

    The lock is the file ``.<name>.lock`` next to the checkpoint, holding the owner's PID, with an
    ``fcntl.flock`` on it: the kernel releases it when the process ends, however it ends (also ``kill -9``),
    so a lock file left by a killed run is stale and simply taken over. :meth:`release` (or leaving the
    ``with`` block) removes the file. A second :meth:`acquire` of a held lock raises
    :class:`CheckpointLocked` naming the owner's PID. Where the file system has no ``flock`` (some network
    file systems) the PID in the file decides: a lock whose process is alive on this machine is held.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> "CheckpointLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = False
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    held = True
                elif e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no flock: the PID decides
                    owner = self._pid()
                    held = owner is not None and owner != os.getpid() and pid_alive(owner)
                else:
                    os.close(fd)
                    raise
            if held:
                os.close(fd)
                raise CheckpointLocked(f"checkpoint {str(self.path)!r} is being written by another run "
                                       f"({self._owner()}); wait for it to end, or write to another folder")
            try:  # the holder we waited for may have removed the file: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _pid(self) -> int | None:
        try:
            return int(self.lock_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _owner(self) -> str:
        pid = self._pid()
        return f"{'' if pid is None else f'PID {pid}, '}lock file {str(self.lock_path)!r}"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # still holding the flock: nobody else owns this file
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "CheckpointLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp")
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
    clean_stale_temps(p.parent)
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
    _check_fields(data, f"checkpoint {str(p)!r}")
    return data


def _check_fields(data: dict[str, Any], where: str) -> None:
    """Types of a (possibly hand-edited) checkpoint's fields, and finite meta-parameters."""
    def bad(msg: str):
        raise CheckpointCorrupt(f"{where}: {msg}")

    if not isinstance(data["method"], str):
        bad(f"method = {data['method']!r} must be a string")
    for k in ("arch", "config", "meta_params", "progress"):
        if not isinstance(data[k], dict):
            bad(f"{k} must be a dict, got {type(data[k]).__name__} {str(data[k])[:60]!r}")
    dims = data["dims"]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                       for d in dims):
        bad(f"dims = {dims!r} must be a list of integers")
    prog = data["progress"]
    unknown = sorted(set(map(str, prog)) - set(PROGRESS_FIELDS))
    if unknown:
        bad(f"progress has unknown field(s) {unknown}; allowed: {list(PROGRESS_FIELDS)}")
    for k in ("meta_batch", "trajectories"):
        v = prog.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad(f"progress.{k} = {v!r} must be an integer >= 0" if k in prog else f"progress lacks {k!r}")
    best = data.get("best")
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("meta_params"), dict)):
        bad("best must be a dict holding meta_params")
    for name, t in data["meta_params"].items():
        if not isinstance(t, torch.Tensor):
            bad(f"meta_params[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            bad(f"meta-parameter {name!r} has {n} non-finite value(s) of {t.numel()}; "
                f"these meta-optimisers cannot be used")


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
