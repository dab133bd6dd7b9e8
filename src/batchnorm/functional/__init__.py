"""Torch-level pure functions. Each picks a backend (``"aten"``, ``"triton"``, ``"auto"``)."""

from .batch_norm import ACTIVATIONS, apply_activation, batch_norm, resolve_backend
from .ghost import ghost_batch_norm
from .group_norm import group_norm, instance_norm, layer_norm
from .renorm import batch_renorm

__all__ = [
    "batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "ACTIVATIONS",
    "apply_activation",
    "resolve_backend",
]
