"""Small helpers shared by the family tests (not a test module)."""

import numpy as np
import torch


def np64(t):
    """Tensor or array -> float64 NumPy copy."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy().copy()
    return np.asarray(t, dtype=np.float64).copy()


def data(shape, seed, dtype=torch.float32, offset=0.0, scale=1.0):
    """Deterministic test input with a per-channel offset pattern (channels differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if len(shape) >= 2:
        x = x + (offset + torch.arange(shape[1], dtype=torch.float64) * 0.3).view((1, -1) + (1,) * (len(shape) - 2))
    return x.to(dtype)


def snapshot(module):
    """Bit-exact copies of every parameter and buffer (to prove a rejected call changed nothing)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, snap):
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} changed by a rejected call"


def dx_scale(dy, gamma, rstd_b):
    """Norm of ``dy * gamma * rstd``: the size of the terms batch norm's dx is a cancellation of."""
    return float(np.linalg.norm(np64(dy) * np64(gamma).reshape((1, -1) + (1,) * (np64(dy).ndim - 2)) * rstd_b))
