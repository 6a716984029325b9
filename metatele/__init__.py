"""metatele: learning to teleport.

Meta-learned optimisers that exploit parameter-space symmetries of neural networks, and the library of
hand-designed symmetry teleportation they are measured against (Zhao et al., NeurIPS 2022 and ICLR 2024).
The public API is re-exported here name by name.
"""
from . import nets, objectives, problems, symmetry
from .baselines import GDResult, gd_step, run_gd
from .nets import forward, from_sequential, to_sequential
from .objectives import curvature, curve_curvature, curve_derivatives, grad_norm_sq, sharpness
from .problems import regression_batch, test_seeds, train_seeds
from .symmetry import exactness, group_element, transform
from .teleport import TeleportReport, random_teleport, random_teleport_model, teleport, teleport_weights

__version__ = "0.1.0"

__all__ = [
    "nets", "objectives", "problems", "symmetry",
    "GDResult", "gd_step", "run_gd",
    "forward", "from_sequential", "to_sequential",
    "curvature", "curve_curvature", "curve_derivatives", "grad_norm_sq", "sharpness",
    "regression_batch", "test_seeds", "train_seeds",
    "exactness", "group_element", "transform",
    "TeleportReport", "random_teleport", "random_teleport_model", "teleport", "teleport_weights",
]

# Learning to teleport (SPEC section 6): meta-optimisers, meta-training, checkpoints, configuration.
from . import learned, meta  # noqa: E402
from .checkpoint import (CheckpointCorrupt, CheckpointError, CheckpointMismatch,  # noqa: E402
                         CheckpointMissing, ProblemMismatch)
from .config import Config, load_config  # noqa: E402
from .learned import (CoordinateUpdateLSTM, LearnedMethod, LearnedOptimizer, LrTeleportLSTM,  # noqa: E402
                      TeleportLSTM, UpdateLSTM)
from .meta import MetaTrainer  # noqa: E402

__all__ += [
    "learned", "meta", "CheckpointCorrupt", "CheckpointError", "CheckpointMismatch", "CheckpointMissing",
    "ProblemMismatch", "Config", "load_config", "CoordinateUpdateLSTM", "LearnedMethod",
    "LearnedOptimizer", "LrTeleportLSTM", "TeleportLSTM", "UpdateLSTM", "MetaTrainer",
]

# Teleport inside standard optimisers and the papers' datasets (SPEC sections 5 and 7).
from . import data, optim  # noqa: E402
from .data import DatasetNotFoundError, TeleportBatches, load_dataset  # noqa: E402
from .optim import (TeleportingOptimizer, TeleportSchedule, TeleportSettings, make_optimizer,  # noqa: E402
                    p2_teleport_config)

__all__ += [
    "data", "optim", "DatasetNotFoundError", "TeleportBatches", "load_dataset", "TeleportingOptimizer",
    "TeleportSchedule", "TeleportSettings", "make_optimizer", "p2_teleport_config",
]
