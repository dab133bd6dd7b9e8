"""batchnorm: batch normalization done properly for PyTorch, and shown to work.

- :mod:`batchnorm.reference` - the algorithm in plain NumPy float64 (the test oracle);
- :mod:`batchnorm.functional` - torch functions with selectable backends;
- :mod:`batchnorm.nn` - drop-in modules (also exported here).
"""

from . import functional, reference
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = ["functional", "reference", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "__version__"]
