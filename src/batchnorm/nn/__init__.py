"""``nn.Module`` drop-ins, each a subclass of the torch.nn class it replaces (see :mod:`._base`)."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .frozen import (FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenBatchNormAct,
                     FrozenBatchNormAct1d, FrozenBatchNormAct2d, FrozenBatchNormAct3d, freeze, unfreeze)
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .groupnorm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze",
    "FrozenBatchNormAct", "FrozenBatchNormAct1d", "FrozenBatchNormAct2d", "FrozenBatchNormAct3d",
    "GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
]  # fmt: skip
