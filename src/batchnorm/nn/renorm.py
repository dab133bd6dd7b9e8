"""Batch renormalization modules (Ioffe, 2017): ``BatchRenorm1d/2d/3d``."""

from __future__ import annotations

from typing import Optional

from ..functional.pipeline import THIS_BATCH, Renorm, ThisBatch
from ..functional.renorm import Limit, RenormSchedule, check_limits, resolve_limit
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule"]


class _BatchRenorm(_BatchNorm):
    r"""Batch renormalization over the channel dimension of an ``(N, C, *)`` input.

    .. math::
        y = \gamma\,\Big(r\,\frac{x - \mu_B}{\sigma_B} + d\Big) + \beta,\quad
        r = \mathrm{clip}\big(\tfrac{\sigma_B}{\sigma}, \tfrac1{r_{max}}, r_{max}\big),\quad
        d = \mathrm{clip}\big(\tfrac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\big)

    in training (``r``, ``d`` held constant in the backward, ``mu``/``sigma`` the running
    statistics), plain batch norm with the running statistics in eval mode. See
    :func:`batchnorm.functional.renorm.batch_renorm`.

    Constructor: that of :class:`torch.nn.BatchNorm2d` plus keyword-only ``r_max`` (>= 1)
    and ``d_max`` (>= 0), each a number or a callable ``step -> number`` evaluated with
    ``num_batches_tracked`` (the steps taken so far), e.g. :class:`RenormSchedule`'s
    ``r_max``/``d_max`` for the paper's schedule. ``track_running_stats`` must be True.

    Parameters, buffers and state_dict are exactly those of ``torch.nn.BatchNorm2d``
    (``r_max``/``d_max`` are configuration, not state; a schedule resumes from the
    restored ``num_batches_tracked``), so checkpoints load both ways with ``strict=True``.
    """

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
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        bias: bool = True,
        check_finite: bool = False,
        backend: str = "auto",
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}: batch renorm corrects towards the running statistics, so "
                f"track_running_stats must be True (for batch statistics only use batchnorm.BatchNorm*d)"
            )
        check_limits(1.0 if callable(r_max) else r_max, 0.0 if callable(d_max) else d_max)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         check_finite=check_finite, backend=backend)  # fmt: skip
        self.r_max = r_max
        self.d_max = d_max

    def limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` for the next training step (schedules evaluated at ``num_batches_tracked``).

        Constant limits need no step count. A schedule needs it on the host: the module keeps a
        Python mirror of ``num_batches_tracked``, advanced by its own training steps and re-read
        from the buffer only after something else wrote it (``load_state_dict``, a reset), so a
        GPU is not synchronized on every step.
        """
        if not (callable(self.r_max) or callable(self.d_max)):
            return self.r_max, self.d_max
        step = self._host_step()
        return resolve_limit(self.r_max, step), resolve_limit(self.d_max, step)

    def _host_step(self) -> int:
        buf = self.num_batches_tracked
        key = (buf.data_ptr(), buf._version) if not buf.is_inference() else None
        mirror = getattr(self, "_step_mirror", None)
        if key is None or mirror is None or mirror[0] != key:
            mirror = (key, int(buf))  # the buffer was written elsewhere: read it once
        self._step_mirror = mirror
        return mirror[1]

    def _source(self) -> ThisBatch:
        r_max, d_max = self.limits()
        check_limits(r_max, d_max)
        source = THIS_BATCH if (r_max == 1 and d_max == 0) else Renorm(r_max, d_max)  # (1, 0): batch norm itself
        self._advance_mirror()
        return source

    def _advance_mirror(self) -> None:
        mirror = getattr(self, "_step_mirror", None)
        if mirror is not None and mirror[0] is not None:  # this step's increment is ours: advance the mirror
            buf = self.num_batches_tracked
            self._step_mirror = ((buf.data_ptr(), buf._version + 1), mirror[1] + 1)

    def _extra_init_kwargs(self) -> dict:
        return {"r_max": self.r_max, "d_max": self.d_max}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max!r}, d_max={self.d_max!r}"


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch renorm of ``(N, C)`` or ``(N, C, L)`` input.

    Example::

        >>> m = BatchRenorm1d(100, r_max=3.0, d_max=5.0)
        >>> y = m(torch.randn(20, 100))
    """


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch renorm of ``(N, C, H, W)`` input.

    Example::

        >>> s = RenormSchedule()                       # the paper's schedule
        >>> m = BatchRenorm2d(64, r_max=s.r_max, d_max=s.d_max)
        >>> y = m(torch.randn(8, 64, 16, 16))
    """


class BatchRenorm3d(_BatchRenorm, BatchNorm3d):
    """Batch renorm of ``(N, C, D, H, W)`` input.

    Example::

        >>> m = BatchRenorm3d(16)
        >>> y = m(torch.randn(4, 16, 4, 8, 8))
    """
