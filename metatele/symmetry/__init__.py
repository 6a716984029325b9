"""Parameter-space symmetries: group elements, group actions with exactness checks, data-free
symmetries and SO(2) symmetries of 2-D benchmark functions (docs/mathematics.md, sections 2 and 3)."""
from .actions import (ACTIONS, Exactness, exactness, inverse_form, linear_form, linearised_form,
                      pseudo_inverse_form, transform)
from .benchmark_functions import BENCHMARK_FUNCTIONS, BOOTH, ROSENBROCK, BenchmarkFunction, rotation, so2_teleport
from .datafree import permute, rescale
from .group import PARAMETRISATIONS, check_group_element, group_element, identity_like, normalise

__all__ = [
    "ACTIONS", "Exactness", "exactness", "inverse_form", "linear_form", "linearised_form",
    "pseudo_inverse_form", "transform", "permute", "rescale", "PARAMETRISATIONS",
    "check_group_element", "group_element", "identity_like", "normalise", "BOOTH", "ROSENBROCK",
    "BENCHMARK_FUNCTIONS", "BenchmarkFunction", "rotation", "so2_teleport",
]
