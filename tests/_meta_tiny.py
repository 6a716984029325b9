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
