"""batchnorm.distributed: batch norm whose statistics span the processes of a torch.distributed group."""

from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm, world_size

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm", "world_size"]
