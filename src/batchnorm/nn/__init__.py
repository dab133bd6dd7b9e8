"""``nn.Module`` drop-ins. One base (:class:`NormBase`) owns parameters, buffers and state-dict compatibility."""

from ._base import NormBase
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["NormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
