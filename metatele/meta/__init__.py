"""Meta-learning machinery: the ``higher`` adapter, the unroller, the truncated-BPTT trainer and
evaluation (docs/meta_learning.md)."""
from .higher_adapter import AutogradStepper, HigherStepper, NoGradStepper
from .trainer import MetaTrainer, Progress, build_method
from .unroll import InnerState, inner_step, rollout, run_window, start, window_meta_loss

__all__ = ["AutogradStepper", "HigherStepper", "NoGradStepper", "MetaTrainer", "Progress",
           "build_method", "InnerState", "inner_step", "rollout", "run_window", "start",
           "window_meta_loss"]
