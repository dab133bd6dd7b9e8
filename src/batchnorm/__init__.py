"""batchnorm: batch normalization done properly for PyTorch, and shown to work.

- :mod:`batchnorm.reference` - the algorithm in plain NumPy float64 (the test oracle);
- :mod:`batchnorm.functional` - torch functions with selectable backends;
- :mod:`batchnorm.nn` - drop-in modules (also exported here);
- :mod:`batchnorm.distributed` - SyncBatchNorm on torch.distributed;
- :mod:`batchnorm.tools` - fold, recalibrate, diagnose, convert;
- :mod:`batchnorm.experiments` - ``batchnorm reproduce``.
"""

from . import functional, reference, tools
from .distributed import SyncBatchNorm, convert_sync_batchnorm
from .nn import *  # noqa: F401,F403
from .nn import __all__ as _nn_all
from .tools import convert, diagnose, fold_batchnorm, recalibrate

__version__ = "0.1.0"

__all__ = [
    "functional", "reference", "tools", "SyncBatchNorm", "convert_sync_batchnorm",
    "fold_batchnorm", "recalibrate", "diagnose", "convert", "__version__",
]  # fmt: skip
__all__.extend(_nn_all)
