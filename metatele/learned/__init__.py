"""Learned optimisers (docs/meta_learning.md, section 2): the LSTM meta-optimisers of P2 and a torch.optim-like wrapper."""
from .any_size import NeuronwiseTeleportLSTM
from .lstm import (CoordinateUpdateLSTM, LrTeleportLSTM, StackedLSTM, TeleportLSTM, UpdateLSTM,
                   detach_state)
from .methods import LearnedMethod, pair_gradients, weight_shapes
from .loading import build_method, load_method
from .preprocess import preprocess
from .optimizer import LearnedOptimizer
from .teleport import apply_learned_teleport

__all__ = ["NeuronwiseTeleportLSTM", "CoordinateUpdateLSTM", "LrTeleportLSTM", "StackedLSTM", "TeleportLSTM", "UpdateLSTM",
           "detach_state", "LearnedMethod", "pair_gradients", "weight_shapes", "preprocess",
           "apply_learned_teleport", "LearnedOptimizer", "build_method", "load_method"]
