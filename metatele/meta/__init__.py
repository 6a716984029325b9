"""Meta-learning machinery: the ``higher`` adapter, the unroller, the truncated-BPTT trainer and
evaluation (docs/meta_learning.md)."""
from .higher_adapter import AutogradStepper, HigherStepper, NoGradStepper
from ..learned.loading import build_method
from .trainer import MetaTrainer, Progress
from .unroll import InnerState, inner_step, rollout, run_window, start, window_meta_loss

__all__ = ["AutogradStepper", "HigherStepper", "NoGradStepper", "MetaTrainer", "Progress",
           "build_method", "InnerState", "inner_step", "rollout", "run_window", "start",
           "window_meta_loss"]
