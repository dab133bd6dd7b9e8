"""The base every normalization module of this library shares.

It owns what torch.nn's ``_NormBase`` owns - parameters (``weight``, ``bias``),
buffers (``running_mean``, ``running_var``, ``num_batches_tracked``), their reset,
``extra_repr`` and state-dict versioning - with the same names and semantics, so
checkpoints load in both directions between ``torch.nn.BatchNorm2d`` and
``batchnorm.BatchNorm2d``. Subclasses choose the expected input rank and the
functional that computes the forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..functional.pipeline import check_eps, check_momentum
from ..functional.stats import PrecisionState


class NormBase(nn.Module):
    """Parameters, running statistics and their bookkeeping for per-channel norms.

    Args:
        num_features: ``C``, the number of channels (dimension 1 of the input).
        eps: added to the variance for numerical stability.
        momentum: weight of the new batch in the running statistics (PyTorch's
            convention; Keras' ``decay=0.99`` is ``momentum=0.01``), or ``None`` for
            the cumulative average.
        affine: learnable per-channel ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
        bias: with ``affine``, whether to learn ``bias`` (beta) too (as in torch >= 2.13).
        track_running_stats: keep ``running_mean``/``running_var`` for inference; when
            False, batch statistics are used in eval mode too.
        check_finite: raise on NaN/Inf input or statistics before running statistics change.
        backend: ``"auto"``, ``"aten"`` or ``"triton"`` (see :func:`batchnorm.functional.batch_norm`).
    """

    _version = 2  # torch.nn's: version 2 added num_batches_tracked
    #: number of input dimensions this class accepts (``None``: any >= 2)
    _input_dims: tuple[int, ...] = ()

    num_features: int
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        check_finite: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int (the channel count C), got {num_features!r}")
        check_eps(eps, type(self).__name__)
        check_momentum(momentum, type(self).__name__)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.check_finite = check_finite
        self.backend = backend
        #: the off-centre decision carried across steps on a GPU (not state_dict state)
        self._precision = PrecisionState()
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, then ``weight = 1`` and ``bias = 0``."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        if self.check_finite:
            s += ", check_finite=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor, got {type(x).__name__}")
        if self._input_dims and x.dim() not in self._input_dims:
            dims = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(
                f"{type(self).__name__}: expected {dims} input, got {x.dim()}D input of shape {tuple(x.shape)}"
            )
        if x.dim() >= 2 and x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}): input has {x.shape[1]} channels "
                f"(dimension 1 of shape {tuple(x.shape)}); expected {self.num_features}. "
                f"Check num_features, or permute channels-last data to (N, C, ...) first."
            )

    def _uses_batch_stats(self) -> bool:
        """Training mode, or eval mode without running statistics (torch.nn's rule)."""
        return self.training or self.running_mean is None

    def _running_stats_to_update(self):
        """``(running_mean, running_var, num_batches_tracked)`` to pass to the functional, or Nones."""
        if self.training and not self.track_running_stats:
            return None, None, None
        return self.running_mean, self.running_var, (self.num_batches_tracked if self.training else None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # checkpoints written before num_batches_tracked existed (torch.nn does the same)
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


#: the per-channel values a normalization module carries (torch.nn's names)
NORM_VALUES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@torch.no_grad()
def copy_norm_values(src: nn.Module, dst: nn.Module) -> None:
    """Copy :data:`NORM_VALUES` from ``src`` into ``dst`` wherever both hold a tensor.

    Values are copied in place (``dst`` keeps its own dtype and device); parameters keep
    ``src``'s ``requires_grad``. Parameters and buffers of the same name map onto each
    other, so this serves any pair of torch.nn / batchnorm / frozen normalization modules.
    """
    for key in NORM_VALUES:
        s, t = getattr(src, key, None), getattr(dst, key, None)
        if isinstance(s, Tensor) and isinstance(t, Tensor):
            t.copy_(s)
            if isinstance(s, nn.Parameter) and isinstance(t, nn.Parameter):
                t.requires_grad_(s.requires_grad)

