"""What this library adds to the torch.nn classes it subclasses.

Every module here *is* the torch.nn class it replaces (``batchnorm.BatchNorm2d`` is a
``torch.nn.BatchNorm2d``, ``batchnorm.SyncBatchNorm`` a ``torch.nn.SyncBatchNorm``, ...), so
``isinstance`` checks in PyTorch and in the ecosystem (``torch.optim.swa_utils.update_bn``,
fvcore, timm, detection codebases) see them, and parameters, buffers, ``state_dict``
versioning, ``reset_parameters`` and ``extra_repr`` are torch.nn's own. What the subclasses
replace is ``forward`` (the normalization pipeline of :mod:`batchnorm.functional.pipeline`),
and what they add is in :class:`BatchNormMixin`: the keyword-only ``check_finite`` and
``backend``, a :class:`~batchnorm.functional.stats.PrecisionState`, argument validation at
construction, and one behaviour under ``torch.fx`` tracing (:func:`fx_leaf`).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, fx, nn

from ..errors import InputError, InputTypeError
from ..functional.backends import BACKENDS
from ..functional.pipeline import THIS_BATCH, ThisBatch, check_count, check_eps, check_momentum, run
from ..functional.stats import PrecisionState

__all__ = ["BatchNormMixin", "fx_leaf", "check_num_features", "torch_init", "NORM_VALUES", "copy_norm_values"]


def fx_leaf(module: nn.Module, *args):
    """Under ``torch.fx`` tracing (a ``Proxy`` argument), record ``module`` as one ``call_module`` node,
    as the tracer does for torch.nn's own modules; else ``None``.

    torch.fx traces *into* modules defined outside ``torch.nn``; ours validate their input and read
    its shape, which a ``Proxy`` cannot answer. As a leaf, the traced graph calls the module itself,
    so ``symbolic_trace``, FX quantization and feature extractors work and keep this library's forward.
    """
    for a in args:  # a plain loop: torch 2.6's dynamo cannot trace next(generator, default)
        if isinstance(a, fx.Proxy):
            tracer = a.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})
    return None


def check_num_features(n, name: str = "num_features") -> int:
    """A channel count: :func:`~batchnorm.functional.pipeline.check_count`, returned as an ``int``."""
    return check_count(n, name, " (the channel count C)")


def torch_init(module: nn.Module, cls: type, *args, bias: bool = True, **kwargs) -> None:
    """``cls.__init__(module, *args, **kwargs, bias=bias)``; on PyTorch releases whose norms have no
    ``bias=`` yet, the bias parameter is removed afterwards (same state_dict as a newer release)."""
    if "bias" in inspect.signature(cls.__init__).parameters:
        cls.__init__(module, *args, bias=bias, **kwargs)
        return
    cls.__init__(module, *args, **kwargs)
    if not bias and getattr(module, "bias", None) is not None:
        module.register_parameter("bias", None)


class BatchNormMixin:
    """The batch-norm family's forward and options, mixed in before a torch.nn ``_BatchNorm`` class.

    ``forward`` runs :func:`batchnorm.functional.pipeline.run` with the statistics source that
    :meth:`_source` names (this batch, here; the variants override only that). Constructor
    arguments are torch.nn's plus keyword-only ``check_finite`` (raise before any update if the
    input or the statistics are not finite) and ``backend`` (``"auto"``, ``"aten"``, ``"triton"``).
    Unlike torch.nn, ``momentum`` must be in [0, 1] or None, ``eps`` a finite number >= 0 and
    ``num_features`` a positive int (docs/compat.md).
    """

    #: input ranks the class accepts (empty: any rank >= 2)
    _input_dims: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 check_finite: bool = False, backend: str = "auto") -> None:  # fmt: skip
        name = type(self).__name__
        num_features = check_num_features(num_features)
        eps = check_eps(eps, name)
        momentum = check_momentum(momentum, name)
        torch_init(self, self._torch_class(), num_features, eps, momentum, affine, track_running_stats, device, dtype,
                   bias=bias)  # fmt: skip
        self._init_options(check_finite, backend)

    @classmethod
    def _torch_class(cls) -> type:
        """The first torch.nn class in the method resolution order: the one this class replaces."""
        return next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn"))

    def _init_options(self, check_finite: bool, backend: str) -> None:
        if backend not in BACKENDS:
            raise InputError(f"{type(self).__name__}: backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(check_finite, bool):
            raise InputTypeError(f"{type(self).__name__}: check_finite must be True or False, got {check_finite!r}")
        self.check_finite = check_finite
        self.backend = backend
        #: the off-centre decision carried across steps on a GPU (not state_dict state)
        self._precision = PrecisionState()

    def _source(self) -> ThisBatch:
        """Where a training step's statistics come from (the variants override this, and only this)."""
        return THIS_BATCH

    def forward(self, input: Tensor) -> Tensor:
        traced = fx_leaf(self, input)
        return traced if traced is not None else self._forward(input)

    def _norm_values(self) -> tuple:
        """``(weight, bias, running_mean, running_var, num_batches_tracked)`` as ``getattr`` gives them,
        read straight from nn.Module's dicts when nothing can shadow them (:func:`_reads_plainly`):
        its ``__getattr__`` costs ~0.4 us per name, a visible share of a small layer's call."""
        if not torch.compiler.is_compiling() and _reads_plainly(self):  # (compiled: dynamo traces getattr)
            p, b = self._parameters, self._buffers
            if "weight" in p and "bias" in p and "running_mean" in b and "running_var" in b \
                    and "num_batches_tracked" in b:  # fmt: skip
                return p["weight"], p["bias"], b["running_mean"], b["running_var"], b["num_batches_tracked"]
        # a parametrization, a hook, a property or an instance attribute: what torch.nn reads in this mode
        tracked = not self.training or self.track_running_stats
        return (self.weight, self.bias, self.running_mean if tracked else None, self.running_var if tracked else None,
                self.num_batches_tracked if self.training and self.track_running_stats else None)  # fmt: skip

    def _forward(self, input: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
        training = self.training
        weight, bias, rm, rv, nbt = self._norm_values()
        if training and not self.track_running_stats:  # batch statistics, nothing to update
            rm = rv = nbt = None
        else:
            nbt = nbt if training else None
            training = training or rm is None  # eval without running statistics: batch statistics (torch.nn)
        return run(input, self._source() if training else THIS_BATCH, weight, bias, rm, rv, nbt, training,
                   self.momentum, self.eps, residual, activation, self.check_finite, self.backend, self._precision,
                   type(self).__name__, self._input_dims, self.num_features)  # fmt: skip

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.check_finite:
            s += ", check_finite=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


_MODULE_GETATTR, _OBJECT_GETATTRIBUTE = nn.Module.__getattr__, object.__getattribute__


def _class_reads_plainly(cls: type) -> bool:
    """No class in ``cls``'s MRO defines a NORM_VALUES name (a property or class attribute would
    shadow nn.Module's dicts), and attribute access is nn.Module's own. Examined once per class and
    kept on the class itself (no registry to leak parametrization classes); a property added to a
    class *after* its first forward is not seen (docs/compat.md)."""
    plain = cls.__dict__.get("_batchnorm_reads_plainly")
    if plain is None:
        plain = not any(n in vars(c) for c in cls.__mro__ for n in NORM_VALUES)
        type.__setattr__(cls, "_batchnorm_reads_plainly", plain)
    return plain and cls.__getattr__ is _MODULE_GETATTR and cls.__getattribute__ is _OBJECT_GETATTRIBUTE


def _reads_plainly(module: nn.Module) -> bool:
    """Whether ``module.weight`` etc. are what nn.Module's dicts hold: see :func:`_class_reads_plainly`,
    and no instance attribute of those names."""
    plain = _class_reads_plainly(type(module))
    d = module.__dict__
    return plain and not ("weight" in d or "bias" in d or "running_mean" in d or "running_var" in d
                          or "num_batches_tracked" in d)  # fmt: skip

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
