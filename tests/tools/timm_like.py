"""Batch-norm + activation modules built the way timm builds them (timm cannot be installed next to the
CPU build of torch here). Written for these tests from timm's documented structure, not copied:

- ``BatchNormAct2d`` subclasses ``torch.nn.BatchNorm2d`` with its own ``forward``: batch norm (the
  same running-statistics rules as torch.nn), then ``self.drop``, then ``self.act``. Constructor
  ``(num_features, eps, momentum, affine, track_running_stats, apply_act, act_layer, act_kwargs,
  inplace, drop_layer, device, dtype)``; ``apply_act=False`` or ``act_layer=None`` make ``act`` an
  ``nn.Identity``; ``drop_layer`` is a class (e.g. ``nn.Dropout``) or None.
- ``SyncBatchNormAct`` subclasses ``torch.nn.SyncBatchNorm`` the same way.
- ``FrozenBatchNormAct2d`` is a plain ``nn.Module`` holding ``weight``/``bias``/``running_*`` as
  buffers, plus ``drop``/``act``.
- ``FutureBatchNormAct2d`` is what this library's ``BatchNormAct2d`` will look like (lead's contract):
  a ``torch.nn.BatchNorm2d`` subclass with ``.act``/``.drop`` and ``forward(x, residual=None)``.
- ``Mystery`` is a batch-norm subclass whose forward does something no tool can know (scales by 2).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _make_act(act_layer, act_kwargs, inplace, apply_act):
    if not apply_act or act_layer is None:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    if act_layer in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU):
        kwargs.setdefault("inplace", inplace)
    return act_layer(**kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None):  # fmt: skip
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, use_batch, factor, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None):  # fmt: skip
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNormAct2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True,
                 drop_layer=None):  # fmt: skip
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        x = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        return self.act(self.drop(x))


class FutureBatchNormAct2d(nn.BatchNorm2d):
    """This library's BatchNormAct2d as announced: torch.nn.BatchNorm2d subclass, ``.act``/``.drop``, a residual."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=False, drop_layer=None, device=None, dtype=None):  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x, residual: Optional[torch.Tensor] = None):
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        return self.act(self.drop(y))


class Mystery(nn.BatchNorm2d):
    """A batch norm subclass whose forward does something else (no .act, no .drop)."""

    def forward(self, x):
        return 2 * super().forward(x)


class LoggingBN(nn.BatchNorm2d):
    """Overrides forward but computes plain batch norm (the check must accept it)."""

    calls = 0

    def forward(self, x):
        LoggingBN.calls += 1
        return super().forward(x)
