"""The one table of tolerances every test uses, and the comparison helper.

Errors are measured as ``||actual - expected|| / ||expected||`` (Frobenius norm, in
float64) against the float64 reference, so one number per dtype suffices: it is
the dtype's unit roundoff times a small factor for the reductions involved.
"""

from __future__ import annotations

import numpy as np
import torch

#: relative-norm tolerance by the dtype the computation ran in
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

#: torch.nn vs this library, same dtype, same native kernels: differences are
#: ordering/rounding only
REL_TOL_VS_TORCH = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

#: gradient checks by finite differences on the float64 reference
FD_TOL = 1e-6

#: float32 inputs with a large offset (mean 1e6, std 1): ours must be below this
LARGE_OFFSET_TOL = 1e-3


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy().copy()
    return np.asarray(a, dtype=np.float64)


def rel_err(actual, expected, scale: float = 0.0) -> float:
    """``||actual - expected|| / max(||expected||, scale, tiny)`` in float64.

    ``scale`` is the norm of the terms a result is computed from when that result
    is a cancellation (e.g. batch norm's dx, which is exactly 0 for N=2 in the limit
    eps -> 0): rounding errors are relative to those terms, not to the small result.
    """
    a, e = _np(actual), _np(expected).reshape(_np(actual).shape)
    den = max(np.linalg.norm(e), scale, np.finfo(np.float64).tiny)
    return float(np.linalg.norm(a - e) / den)


def assert_rel_close(actual, expected, tol: float, what: str = "value", scale: float = 0.0) -> None:
    """Assert ``rel_err <= tol``; on failure report the error and the worst element."""
    a, e = _np(actual), _np(expected)
    assert a.size == e.size, f"{what}: size {a.size} != expected size {e.size}"
    e = e.reshape(a.shape)
    err = rel_err(a, e, scale)
    if not err <= tol:
        diff = np.abs(a - e)
        idx = np.unravel_index(int(np.nanargmax(diff)) if np.isfinite(diff).any() else 0, a.shape)
        raise AssertionError(
            f"{what}: relative error {err:.3e} > tol {tol:.1e}; worst at index {tuple(int(i) for i in idx)}: "
            f"got {a[idx]!r}, expected {e[idx]!r} (|diff| {diff[idx]:.3e})"
        )


def tol_for(dtype: torch.dtype) -> float:
    return REL_TOL[dtype]
