"""metatele: learning to teleport.

Meta-learned optimisers that exploit parameter-space symmetries of neural networks, and the library of
hand-designed symmetry teleportation they are measured against (Zhao et al., NeurIPS 2022 and ICLR 2024;
see ``docs/references.md``). The public API is re-exported here name by name, in three groups:

* symmetry teleportation: networks, group actions, objectives, teleports, GD baselines, problems;
* learning to teleport (``docs/meta_learning.md``): meta-optimisers, meta-training, checkpoints, configuration;
* teleport inside standard ``torch.optim`` optimisers and the papers' datasets.
"""
from . import data, learned, meta, nets, objectives, optim, problems, symmetry
from .baselines import GDResult, gd_step, run_gd
from .checkpoint import (CheckpointCorrupt, CheckpointError, CheckpointMismatch, CheckpointMissing,
                         ProblemMismatch)
from .config import Config, load_config
from .data import DatasetNotFoundError, TeleportBatches, load_dataset
from .learned import (CoordinateUpdateLSTM, LearnedMethod, LearnedOptimizer, LrTeleportLSTM, TeleportLSTM,
                      UpdateLSTM)
from .meta import MetaTrainer
from .nets import forward, from_sequential, to_sequential
from .objectives import curvature, curve_curvature, curve_derivatives, grad_norm_sq, sharpness
from .optim import TeleportingOptimizer, TeleportSchedule, TeleportSettings, make_optimizer, p2_teleport_config
from .problems import eval_seeds, regression_batch, train_seeds
from .symmetry import exactness, group_element, transform
from .teleport import TeleportReport, random_teleport, random_teleport_model, teleport, teleport_weights

__version__ = "0.1.0"

__all__ = [
    # symmetry teleportation
    "nets", "objectives", "problems", "symmetry",
    "GDResult", "gd_step", "run_gd",
    "forward", "from_sequential", "to_sequential",
    "curvature", "curve_curvature", "curve_derivatives", "grad_norm_sq", "sharpness",
    "eval_seeds", "regression_batch", "train_seeds",
    "exactness", "group_element", "transform",
    "TeleportReport", "random_teleport", "random_teleport_model", "teleport", "teleport_weights",
    # learning to teleport
    "learned", "meta", "CheckpointCorrupt", "CheckpointError", "CheckpointMismatch", "CheckpointMissing",
    "ProblemMismatch", "Config", "load_config", "CoordinateUpdateLSTM", "LearnedMethod",
    "LearnedOptimizer", "LrTeleportLSTM", "TeleportLSTM", "UpdateLSTM", "MetaTrainer",
    # teleport inside torch.optim optimisers; datasets
    "data", "optim", "DatasetNotFoundError", "TeleportBatches", "load_dataset", "TeleportingOptimizer",
    "TeleportSchedule", "TeleportSettings", "make_optimizer", "p2_teleport_config",
]
