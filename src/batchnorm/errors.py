"""Error classes: each also derives from the exception type ``torch.nn`` raises for the same mistake.

``torch.nn`` signals a wrong input rank with ``ValueError``, a channel/dtype/device mismatch
found by the native kernel with ``RuntimeError``, and a non-tensor input with
``TypeError``. Code written for ``torch.nn`` catches those; code written for this library
may catch the more specific class. Both work, because every class below derives from the
built-in type that describes the mistake *and* from ``RuntimeError``:

=====================  ======================================  =============================
class                  raised for                              catchable as
=====================  ======================================  =============================
``InputError``         wrong rank, channels, too few values,   ``ValueError``, ``RuntimeError``
                       bad eps/momentum, wrong residual shape
``InputTypeError``     non-floating input, parameter dtype     ``TypeError``, ``RuntimeError``
                       mismatch
``NonFiniteError``     ``check_finite=True`` found NaN/Inf or  ``FloatingPointError``,
                       overflowing statistics                  ``RuntimeError``
=====================  ======================================  =============================
"""

from __future__ import annotations

__all__ = ["InputError", "InputTypeError", "NonFiniteError"]


class InputError(ValueError, RuntimeError):
    """A value or shape the call cannot use (``ValueError`` and ``RuntimeError``)."""


class InputTypeError(TypeError, RuntimeError):
    """A dtype or type the call cannot use (``TypeError`` and ``RuntimeError``)."""


class NonFiniteError(FloatingPointError, RuntimeError):
    """``check_finite=True`` found NaN/Inf in the input or in the statistics (nothing was updated)."""
