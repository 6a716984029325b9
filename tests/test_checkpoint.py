"""metatele.checkpoint: atomic versioned save/load and one typed error per bad-checkpoint case."""
import os

import pytest
import torch

from _meta_tiny import tiny_config
from metatele.checkpoint import (CheckpointCorrupt, CheckpointError, CheckpointMismatch, CheckpointMissing,
                                 ProblemMismatch, load_checkpoint, save_checkpoint)
from metatele.meta import MetaTrainer
from metatele.meta.evaluate import evaluate, load_method


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tr = MetaTrainer("lstm_update_tele", tiny_config())
    tr.run_meta_batch()
    path = tmp_path_factory.mktemp("ck") / "lstm_update_tele.pt"
    tr.save(path)
    return path


def test_roundtrip_holds_everything(ckpt):
    d = load_checkpoint(ckpt)
    for k in ("method", "arch", "dims", "config", "meta_params", "meta_optim", "progress", "rng", "versions"):
        assert k in d
    assert d["method"] == "lstm_update_tele" and d["dims"] == [4, 5, 4, 3]
    assert d["progress"]["meta_batch"] == 1 and set(d["versions"]) >= {"torch", "higher", "python"}
    m, cfg, _ = load_method(ckpt)
    for k, v in m.state_dict().items():
        assert torch.equal(v, d["meta_params"][k])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "x.pt"
    save_checkpoint(p, {"method": "a", "arch": {}, "dims": [1], "config": {}, "meta_params": {}, "progress": {}})
    first = p.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(Exception):
        save_checkpoint(p, {"method": "b", "arch": {}, "dims": [1], "config": {}, "meta_params": {},
                            "progress": {}, "bad": Boom()})
    assert p.read_bytes() == first                       # the old checkpoint survived the crash
    assert os.listdir(tmp_path) == ["x.pt"]              # no half-written temporary left behind


def test_missing(tmp_path):
    with pytest.raises(CheckpointMissing, match="does not exist"):
        load_method(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_metatele"])
def test_corrupt(ckpt, tmp_path, damage):
    p = tmp_path / "bad.pt"
    if damage == "garbage":
        p.write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "truncated":
        p.write_bytes(ckpt.read_bytes()[:300])
    else:
        torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(CheckpointCorrupt):
        load_method(p)


def test_other_architecture(ckpt, tmp_path):
    d = load_checkpoint(ckpt)
    other = MetaTrainer("lstm_update_tele", tiny_config(lstm__update_hidden=5))
    d["meta_params"] = other.method.state_dict()        # weights of another architecture
    p = tmp_path / "arch.pt"
    save_checkpoint(p, d)
    with pytest.raises(CheckpointMismatch, match="architecture"):
        load_method(p)


def test_other_problem_size(ckpt, tmp_path):
    tr = MetaTrainer("lstm_update", tiny_config(problem__dims=[4, 6, 4, 3]))
    p = tmp_path / "lstm_update.pt"
    tr.save(p)
    with pytest.raises(ProblemMismatch, match="dims"):
        evaluate([ckpt, p], seeds=2, steps=2)
    d = load_checkpoint(ckpt)
    d["dims"] = [4, 6, 4, 3]                             # stored dims disagree with its configuration
    q = tmp_path / "dims.pt"
    save_checkpoint(q, d)
    with pytest.raises(ProblemMismatch):
        load_method(q)
    assert issubclass(ProblemMismatch, CheckpointMismatch) and issubclass(CheckpointMismatch, CheckpointError)


def _dead_pid() -> int:
    from _meta_tiny import in_child

    r, w = os.pipe()
    in_child(lambda: os.write(w, str(os.getpid()).encode()) and 0)
    os.close(w)
    pid = int(os.read(r, 32))
    os.close(r)
    return pid                                           # exited and reaped: no such process now


def test_lock_refuses_a_second_writer_and_takes_over_a_killed_runs_lock(tmp_path):
    """Issue 9 item 5: one writer per checkpoint; the lock goes with the process, however it ends."""
    import signal
    import time

    from _meta_tiny import in_child
    from metatele.checkpoint import CheckpointLock, CheckpointLocked

    p = tmp_path / "lstm_update.pt"
    with CheckpointLock(p) as lock:
        assert lock.held and lock.lock_path.read_text().strip() == str(os.getpid())
        with pytest.raises(CheckpointLocked, match=f"another run \\(PID {os.getpid()}"):
            CheckpointLock(p).acquire()
    assert os.listdir(tmp_path) == []                    # released: the lock file is gone

    def hold_and_die():                                  # a run killed with kill -9 while holding the lock
        CheckpointLock(p).acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    assert in_child(hold_and_die) == -signal.SIGKILL
    assert (tmp_path / ".lstm_update.pt.lock").exists()  # left behind, naming a dead process
    t0 = time.perf_counter()
    with CheckpointLock(p):                              # stale: taken over at once
        pass
    assert time.perf_counter() - t0 < 1.0 and os.listdir(tmp_path) == []


def test_lock_without_flock_falls_back_to_the_pid(tmp_path, monkeypatch):
    """On a file system without flock the PID in the lock file decides."""
    import errno
    import fcntl

    from metatele.checkpoint import CheckpointLock, CheckpointLocked

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    p = tmp_path / "x.pt"
    (tmp_path / ".x.pt.lock").write_text(f"{_dead_pid()}\n")   # left by a killed run
    with CheckpointLock(p):
        pass
    (tmp_path / ".x.pt.lock").write_text("1\n")                # PID 1 is alive
    with pytest.raises(CheckpointLocked, match="PID 1"):
        CheckpointLock(p).acquire()


def test_stale_temporary_files_are_removed(tmp_path):
    """Issue 9 item 7: temporary files of writers killed during a save go at the next save to the folder;
    those of live writers (here: this process) and recent ones of unknown writers stay."""
    from metatele.checkpoint import STALE_TEMP_S, clean_stale_temps

    dead, me = _dead_pid(), os.getpid()
    names = {"dead": f".a.pt.{dead}.x1y2z3.tmp", "dead_other_ckpt": f".b.pt.{dead}.qwerty.tmp",
             "mine": f".a.pt.{me}.abcdef.tmp", "old_unknown": ".a.pt.olderfmt.tmp", "new_unknown": ".a.pt.newerfmt.tmp",
             "not_a_temp": "notes.tmp"}
    for n in names.values():
        (tmp_path / n).write_bytes(b"half a checkpoint")
    old = (tmp_path / names["old_unknown"]).stat().st_mtime - STALE_TEMP_S - 1
    os.utime(tmp_path / names["old_unknown"], (old, old))
    save_checkpoint(tmp_path / "a.pt", {"method": "a", "arch": {}, "dims": [1], "config": {}, "meta_params": {},
                                        "progress": {"meta_batch": 0, "trajectories": 0}})
    left = set(os.listdir(tmp_path))
    assert left == {"a.pt", names["mine"], names["new_unknown"], names["not_a_temp"]}
    assert clean_stale_temps(tmp_path) == []


@pytest.mark.parametrize("edit", ["arch_string", "progress_without_meta_batch", "progress_unknown_field",
                                  "nan_meta_params", "inf_meta_params", "dims_strings"])
def test_hand_edited_or_non_finite_checkpoint_is_refused(ckpt, tmp_path, edit):
    """Issue 9 item 10: a typed one-line error, never a traceback, and no evaluation of NaN weights."""
    d = load_checkpoint(ckpt)
    if edit == "arch_string":
        d["arch"] = "lstm"
    elif edit == "progress_without_meta_batch":
        del d["progress"]["meta_batch"]
    elif edit == "progress_unknown_field":
        d["progress"]["epoch"] = 3
    elif edit == "dims_strings":
        d["dims"] = ["4", "5"]
    else:
        name = next(iter(d["meta_params"]))
        d["meta_params"][name].view(-1)[0] = float("nan" if edit == "nan_meta_params" else "inf")
    p = tmp_path / "edited.pt"
    save_checkpoint(p, d)
    with pytest.raises(CheckpointCorrupt) as e:
        load_method(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    assert {"arch_string": "arch must be a dict", "progress_without_meta_batch": "lacks 'meta_batch'",
            "progress_unknown_field": "unknown field(s) ['epoch']", "nan_meta_params": "non-finite",
            "inf_meta_params": "non-finite", "dims_strings": "dims = ['4', '5']"}[edit] in msg


def test_progress_fields_match_the_trainer():
    import dataclasses

    from metatele.checkpoint import PROGRESS_FIELDS
    from metatele.meta.trainer import Progress

    assert tuple(f.name for f in dataclasses.fields(Progress)) == PROGRESS_FIELDS
