"""Torch-level pure functions. Each picks a backend (``"aten"``, ``"triton"``, ``"auto"``)."""

from .batch_norm import ACTIVATIONS, apply_activation, batch_norm, resolve_backend

__all__ = ["batch_norm", "ACTIVATIONS", "apply_activation", "resolve_backend"]
