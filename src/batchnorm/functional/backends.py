"""Backends: who runs the fused "statistics + normalize (+ residual, activation)" step and inference.

Two implementations of one small interface, chosen in one place (:func:`select`):

* :class:`Aten` - PyTorch's native kernels (``torch.native_batch_norm``), then the residual
  add and the activation as separate ops. The CPU default, and the CUDA default for plain
  batch norm.
* :class:`Triton` - this library's fused kernels (:mod:`batchnorm.kernels`): one statistics
  pass and one output pass with the residual and the activation fused in; float64 input is
  handed to :class:`Aten` (the kernels compute in float32).

Interface (static methods):

* ``train(x, weight, bias, eps, residual, activation, running=None, factor=0.0) -> (y, mean, rstd)``:
  training-mode output and the batch ``mean``/``rstd`` (``(C,)``, statistics dtype, detached);
  ``running=(running_mean, running_var)`` asks for the moving-average update inside the kernel
  with weight ``factor`` (Aten only: ``updates_in_kernel``);
* ``infer(x, mean, var, weight, bias, eps, residual, activation, shift=None) -> y``: normalize
  with constants (the running statistics), of ``x - shift`` when a shift is given;
* ``update_running(running, mean, rstd, eps, count, momentum) -> bool``: the moving-average
  update as one call where the backend has one (Triton: one launch), else ``False`` and the
  pipeline's tensor ops do it;
* ``centres_itself``: whether ``train`` is exact at large offsets on its own (the Triton
  kernels shift by a pivot internally); otherwise the pipeline applies the precision rule.

``"auto"`` (:func:`select`): Triton only on CUDA and only for the *fused* form (a residual or
an activation), whose purpose is the Triton kernel; plain batch norm keeps PyTorch's kernels
until the Triton ones have been measured on a GPU (docs/kernels.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..kernels import is_available as triton_available
from .normalize import affine_args

__all__ = ["Aten", "Triton", "select", "ACTIVATIONS", "BACKENDS", "apply_activation", "epilogue", "triton_available"]

#: activations that can follow the normalization (fused by the Triton backend)
ACTIVATIONS = ("identity", "relu", "silu")
BACKENDS = ("auto", "aten", "triton")


def apply_activation(y: Tensor, activation: Optional[str]) -> Tensor:
    """Apply one of :data:`ACTIVATIONS` (``None`` means identity)."""
    if activation is None or activation == "identity":
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    raise InputError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def epilogue(y: Tensor, residual: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """``act(y + residual)``: what the Triton kernels fuse, as separate ops."""
    if residual is not None:
        y = y + residual
    return apply_activation(y, activation)


class Aten:
    """PyTorch's native kernels (see the module docstring)."""

    name = "aten"
    centres_itself = False
    updates_in_kernel = True

    @staticmethod
    def train(x, weight, bias, eps, residual, activation, running=None, factor=0.0):
        w, b = affine_args(x, weight, bias)
        rm, rv = running if running is not None else (None, None)
        y, mean, rstd = torch.native_batch_norm(x, w, b, rm, rv, True, factor, eps)
        if residual is not None or activation is not None:
            y = epilogue(y, residual, activation)
        return y, mean, rstd  # the statistics outputs are not differentiable: nothing to detach

    @staticmethod
    def update_running(running, mean, rstd, eps, count, momentum) -> bool:
        """A separate one-call running update: none here (``train`` updates inside the kernel)."""
        return False

    @staticmethod
    def infer(x, mean, var, weight, bias, eps, residual, activation, shift=None):
        w, b = affine_args(x, weight, bias)
        if mean.dtype in (torch.float16, torch.bfloat16):  # half buffers: statistics in float32
            mean, var = mean.float(), var.float()
        if shift is not None:
            x = x - shift.view((1, -1) + (1,) * (x.dim() - 2))
            mean = mean - shift.to(mean.dtype)
        y = torch.native_batch_norm(x, w, b, mean, var, False, 0.0, eps)[0]
        return epilogue(y, residual, activation)


class Triton:
    """This library's fused Triton kernels (see :mod:`batchnorm.kernels`)."""

    name = "triton"
    centres_itself = True
    updates_in_kernel = False

    @staticmethod
    def train(x, weight, bias, eps, residual, activation, running=None, factor=0.0):
        if x.dtype == torch.float64:
            return Aten.train(x, weight, bias, eps, residual, activation)
        from ..kernels import ops

        y, mean, rstd, _, _ = ops.bn_act_train(x, weight, bias, residual, float(eps), activation or "identity")
        return y, mean.detach(), rstd.detach()

    @staticmethod
    def update_running(running, mean, rstd, eps, count, momentum) -> bool:
        """The running update in one launch (``kernels.ops.bn_running_update``) where it applies:
        float32/half contiguous buffers on the statistics' device, more than one value per channel."""
        rm, rv, nbt = running
        if (rm.dtype == torch.float64 or not (rm.is_contiguous() and rv.is_contiguous()) or rm.device != mean.device
                or rv.dtype != rm.dtype or count < 2 or mean.dtype != torch.float32):  # fmt: skip
            return False
        from ..kernels import ops

        ops.bn_running_update(rm, rv, nbt, mean, rstd, float(eps), int(count), momentum)
        return True

    @staticmethod
    def infer(x, mean, var, weight, bias, eps, residual, activation, shift=None):
        if x.dtype == torch.float64 or x.numel() == 0 or shift is not None:
            return Aten.infer(x, mean, var, weight, bias, eps, residual, activation, shift)
        from ..kernels import ops

        return ops.bn_act_infer(x, mean, var, weight, bias, residual, float(eps), activation or "identity")


def select(backend: str, x: Tensor, *, fused: bool = False):
    """The backend for this call: ``"aten"``, ``"triton"``, or ``"auto"`` (see the module docstring).

    ``fused`` says whether the call has a residual or an activation to fuse.
    """
    if backend == "aten":
        return Aten
    if backend == "auto":
        return Triton if fused and x.is_cuda and triton_available(x) else Aten
    if backend == "triton":
        if not triton_available(x):
            raise InputError(
                "backend='triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1 for the "
                "CPU interpreter); install it with `pip install batchnorm[triton]`, or use backend='aten'."
            )
        return Triton
    raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
