"""Torch-level pure functions: the normalization pipeline and the public norms built on it.

* :mod:`.stats` - statistics (the one precision rule) and the off-centre decision;
* :mod:`.normalize` - the one "normalize with given statistics" autograd Function;
* :mod:`.backends` - aten and triton, chosen in one place;
* :mod:`.pipeline` - validate -> statistics -> check -> normalize -> update, with sources;
* the public functions: :func:`batch_norm`, :func:`ghost_batch_norm`, :func:`batch_renorm`,
  :func:`group_norm`, :func:`layer_norm`, :func:`instance_norm`.
"""

from .backends import ACTIVATIONS, apply_activation
from .batch_norm import batch_norm
from .ghost import ghost_batch_norm
from .group_norm import group_norm, instance_norm, layer_norm
from .renorm import batch_renorm
from .stats import BatchStats, PrecisionState, moments

__all__ = [
    "batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "moments",
    "BatchStats",
    "PrecisionState",
    "ACTIVATIONS",
    "apply_activation",
]
