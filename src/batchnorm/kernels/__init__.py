r"""Fused batch-norm kernels in Triton: the ``backend="triton"`` of :func:`batchnorm.functional.batch_norm`.

Three tiers (see ``docs/kernels.md`` for the derivation):

* :mod:`._jit` - ``@triton.jit`` kernels: partial Welford/Chan statistics, the fused
  normalize + affine + residual + activation pass, and the two-pass backward;
* :mod:`.launch` - host launchers: per-channel ``(N, C, S)`` views of contiguous,
  channels_last and strided tensors, block sizes, split, ``num_warps``;
* :mod:`.ops` - ``torch.library`` custom ops with fake implementations and autograd,
  so ``torch.compile(fullgraph=True)`` traces them.

The backend that calls these ops (validation, the running statistics, float64 and the
choice between PyTorch's kernels and these) is :class:`batchnorm.functional.backends.Triton`;
this package never imports :mod:`batchnorm.functional`.

Importing this package never imports Triton; :func:`is_available` says whether it can run.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["is_available", "ACTIVATIONS"]

#: fused activations; ``None`` means ``"identity"``
ACTIVATIONS = ("identity", "relu", "silu")

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def is_available(x: Tensor) -> bool:
    """Whether the kernels can run on ``x``: Triton is installed and ``x`` is on a CUDA device,
    or ``x`` is on the CPU and ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).

    Example::

        >>> is_available(torch.zeros(2, 3))   # True only under TRITON_INTERPRET=1
        False
    """
    if not _HAS_TRITON or not isinstance(x, Tensor):
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
