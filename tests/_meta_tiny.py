"""Tiny configurations shared by the meta-learning tests (fast on 2 CPU cores)."""
from __future__ import annotations

import copy

from metatele.config import Config, config_from_dict

TINY = {
    "problem": {"dims": [4, 5, 4, 3], "dtype": "float32"},
    "lstm": {"update_hidden": 8, "tele_hidden": 6, "lr_tele_hidden": 4, "coord_hidden": 4,
             "preprocess": "log_sign", "update_scale": 0.01, "lr_param": "log_sigmoid", "lr_init": 1e-2,
             "lr_max": 5e-2, "lr_min": 1e-5},
    "teleport": {"magnitude": 0.05},
    "meta": {"unroll": 3, "lr_update": 1e-2, "lr_teleport": 1e-2, "lr_lr_teleport": 1e-2},
    "train": {"batch": 2, "save_every": 1},
    "eval": {"seeds": 3, "gd_lr": 1e-2, "report_steps": [0, 3], "thresholds": [1.0]},
    "methods": {m: {"trajectories": 4, "steps": 6} for m in ("lstm_update_tele", "lstm_update", "lstm_lr_tele")},
}

TINY_TOML = """
[problem]
dims = [4, 5, 4, 3]
[lstm]
update_hidden = 8
tele_hidden = 6
lr_tele_hidden = 4
preprocess = "log_sign"
update_scale = 0.01
lr_param = "log_sigmoid"
lr_init = 1e-2
lr_max = 5e-2
lr_min = 1e-5
[meta]
unroll = 3
[train]
batch = 2
[eval]
seeds = 3
gd_lr = 1e-2
report_steps = [0, 3]
thresholds = [1.0]
[methods.lstm_update_tele]
trajectories = 4
steps = 6
[methods.lstm_update]
trajectories = 4
steps = 6
[methods.lstm_lr_tele]
trajectories = 4
steps = 6
"""


def tiny_config(**overrides) -> Config:
    """TINY with ``section__key=value`` overrides, validated."""
    d = copy.deepcopy(TINY)
    for k, v in overrides.items():
        sec, key = k.split("__")
        d.setdefault(sec, {})[key] = v
    return config_from_dict(d)


def straight_and_resumed(cfg: Config, method: str, path, meta_batches: int = 4):
    """Two trainers of ``method``: one run straight through ``meta_batches`` meta-batches, one stopped
    halfway, saved to ``path``, rebuilt from the checkpoint and run to the end. Returns ``(straight,
    resumed, progress at the save)``; a test then compares them."""
    from metatele.meta import MetaTrainer
    a = MetaTrainer(method, cfg)
    for _ in range(meta_batches):
        a.run_meta_batch()
    b = MetaTrainer(method, cfg)
    for _ in range(meta_batches // 2):
        b.run_meta_batch()
    b.save(path)
    del b
    c = MetaTrainer.resume(path)
    saved = copy.deepcopy(c.progress), c.population and c.population.next_seed
    for _ in range(meta_batches - meta_batches // 2):
        c.run_meta_batch()
    for (k, x), (_, y) in zip(a.method.state_dict().items(), c.method.state_dict().items()):
        assert (x == y).all(), k
    assert a.progress.history == c.progress.history
    return a, c, saved


def in_child(fn, timeout: float = 60.0) -> int:
    """Run ``fn()`` in a forked child process (no interpreter start-up cost) and return how it ended:
    its exit code, or minus the signal that killed it. ``fn`` may end the child with ``os.kill``."""
    import os
    import signal
    import time
    import traceback

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            import torch
            torch.set_num_threads(1)
            rc = fn()
            code = rc if isinstance(rc, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 99
        finally:
            import sys
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    t_end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > t_end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} still running after {timeout} s")
        time.sleep(0.01)
