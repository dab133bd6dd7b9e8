"""The algorithm in plain NumPy float64: readable teaching code and the oracle every test trusts.

See :mod:`batchnorm.reference.core` for the math.
"""

from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401
