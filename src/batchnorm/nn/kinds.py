r"""One way to recognise a batch norm: which modules are batch norms, and what each applies after normalizing.

Every model tool (``freeze``/``unfreeze``, :mod:`batchnorm.tools` ``convert``, ``fold_batchnorm``,
``recalibrate``, ``diagnose``) asks this module, and nothing else, what a module is.

A **batch norm** is a module whose eval-mode function, per channel ``c`` of dimension 1, is

.. math::
    \mathrm{BN}(x)_c = \gamma_c\,\frac{x_c - \hat\mu_c}{\sqrt{\hat\sigma^2_c + \epsilon}} + \beta_c

with running statistics :math:`\hat\mu, \hat\sigma^2` (or the batch's, with
``track_running_stats=False``), possibly followed by **extras** - modules applied to that
result. Recognised as batch norms: every ``torch.nn`` ``_BatchNorm`` (``BatchNorm1d/2d/3d``,
``SyncBatchNorm`` and their subclasses, e.g. timm's ``BatchNormAct2d``), this library's
batch-norm family, and frozen batch norms (this library's ``FrozenBatchNorm*d``, torchvision's
and timm's ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``). Instance, group and layer norms are not
(their eval statistics come from the input).

:func:`kind_of` says, for one batch norm:

- ``extras``: what follows the normalization, in order. A module built like timm's
  ``BatchNormAct2d`` (dropout in ``.drop``, activation in ``.act``; ``apply_act=False`` makes
  ``.act`` an ``nn.Identity``) has ``(("drop", m.drop), ("act", m.act))`` - this library's
  ``BatchNormAct*d`` included; a module that names its activation in a string attribute
  ``activation = "relu"`` (as this library's first ``BatchNormAct*d`` did) has ``(("act", nn.ReLU()),)``.
- ``problem``: ``None`` when the eval-mode forward is *known* to be ``extras(BN(x))``; otherwise why
  not. A class whose ``forward`` is that of a known plain batch norm (torch.nn's or this library's,
  also inherited by a subclass) is known. Any other class - one that overrides ``forward``, or has
  extras - is **checked**: a copy in float64 and eval mode is run on a small random input and compared
  with ``extras(BN(x))`` computed from its own running statistics and affine; a mismatch (or a
  forward that cannot run) is a ``problem``. So a tool never treats a module as a plain batch norm
  when it is not: it keeps the extras, or refuses with ``problem`` in the message.

Example::

    >>> k = kind_of(torch.nn.BatchNorm2d(8))
    >>> k.plain, k.extras, k.problem
    (True, (), None)
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ._base import copy_norm_values

__all__ = [
    "BNKind",
    "AfterNorm",
    "is_batchnorm",
    "is_frozen",
    "kind_of",
    "batchnorm_modules",
    "has_running_stats",
    "never_updated",
    "num_channels",
    "bn_dims",
    "activation_module",
    "activation_name",
    "attach_extras",
    "copy_norm_values",
]

#: this library's string activations (``BatchNormAct*d(activation=...)``) as modules
_ACT_BY_NAME = {"relu": nn.ReLU, "silu": nn.SiLU}

#: public names of this library's batch norms whose eval forward is plain batch norm
_OUR_PLAIN = (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "SyncBatchNorm",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
)  # fmt: skip
#: public names of every batch-norm class of this library (with extras too)
_OUR_BN = _OUR_PLAIN + ("BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d")
#: public names of this library's norms that are *not* batch norms
_OUR_NOT_BN = ("GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
_TORCH_NOT_BN = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

#: relative error (float64 probe) above which a checked forward is not ``extras(BN(x))``
PROBE_TOL = 1e-6


def _ours(names) -> tuple:
    """This library's public classes among ``names`` (looked up when first needed: no import cycle)."""
    import batchnorm

    return tuple(c for c in (getattr(batchnorm, n, None) for n in names) if isinstance(c, type))


def _plain_forwards() -> set:
    classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm) + _ours(_OUR_PLAIN)
    return {c.forward for c in classes}


def _is_frozen_name(m: nn.Module) -> bool:
    return "frozenbatchnorm" in type(m).__name__.lower()


def is_batchnorm(m: nn.Module) -> bool:
    """Whether ``m`` is a batch norm (see the module docstring); instance/group/layer norms are not.

    Example::

        >>> is_batchnorm(torch.nn.BatchNorm1d(4)), is_batchnorm(torch.nn.GroupNorm(2, 4))
        (True, False)
    """
    if not isinstance(m, nn.Module) or isinstance(m, _TORCH_NOT_BN + _ours(_OUR_NOT_BN)):
        return False
    if isinstance(m, _TorchBatchNorm) or isinstance(m, _ours(_OUR_BN)):
        return True
    name = type(m).__name__.lower()
    if any(w in name for w in ("instance", "group", "layer")):
        return False
    # look-alikes holding the statistics as tensors (torchvision's / timm's FrozenBatchNorm2d, ...)
    return ("batchnorm" in name or "batchrenorm" in name) and all(
        isinstance(getattr(m, a, None), Tensor) for a in ("running_mean", "running_var")
    )


def is_frozen(m: nn.Module) -> bool:
    """A batch norm with fixed statistics by design (this library's, torchvision's or timm's ``FrozenBatchNorm*``).

    Its statistics are never estimated from batches, so it cancels no bias before it and has no
    train/eval gap. Example: ``is_frozen(batchnorm.FrozenBatchNorm2d(4))`` is True.
    """
    frozen = _ours(("FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"))
    return is_batchnorm(m) and (_is_frozen_name(m) or isinstance(m, frozen))


def has_running_stats(m: nn.Module) -> bool:
    """Whether eval mode uses running statistics (``running_mean``/``running_var`` are tensors)."""
    return isinstance(getattr(m, "running_mean", None), Tensor) and isinstance(getattr(m, "running_var", None), Tensor)


def never_updated(m: nn.Module) -> bool:
    """Running statistics still at their initial values: mean exactly 0 and variance exactly 1 in every
    channel, with ``num_batches_tracked`` 0 or absent.

    A counter of 0 alone does not count: a checkpoint without the counter (torchvision's frozen BN,
    pre-1.0 torch) loads with 0 but real statistics.
    """
    if not has_running_stats(m):
        return False
    nbt = getattr(m, "num_batches_tracked", None)
    if isinstance(nbt, Tensor) and int(nbt) != 0:
        return False
    return bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())


def num_channels(m: nn.Module) -> int:
    """``C``: ``num_features``, else the size of the running statistics or of ``weight``."""
    c = getattr(m, "num_features", None)
    if c is None:
        c = m.running_mean.numel() if has_running_stats(m) else m.weight.numel()
    return int(c)


def bn_dims(m: nn.Module) -> Optional[int]:
    """1, 2 or 3 for a ``BatchNorm{1,2,3}d`` flavour (``None`` if dimension-agnostic, e.g. SyncBatchNorm)."""
    for k, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(m, cls):
            return k
    dims = getattr(type(m), "_input_dims", None)
    if dims:
        return max(dims) - 2
    for k in (1, 2, 3):
        if type(m).__name__.endswith(f"{k}d"):
            return k
    return None


def activation_module(name: Optional[str]) -> Optional[nn.Module]:
    """The module for one of this library's string activations (``None``/``"identity"``: ``None``)."""
    if name is None or name == "identity":
        return None
    if name not in _ACT_BY_NAME:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACT_BY_NAME)} or 'identity'")
    return _ACT_BY_NAME[name]()


def activation_name(m: Optional[nn.Module]) -> Optional[str]:
    """The string activation equal to module ``m`` (``None`` for no/identity activation); raises
    ``ValueError`` if this library's string activations cannot express it."""
    if m is None or type(m) is nn.Identity:
        return None
    for name, cls in _ACT_BY_NAME.items():
        if type(m) is cls:
            return name
    raise ValueError(f"{type(m).__name__} is not one of this library's string activations {sorted(_ACT_BY_NAME)}")


class AfterNorm(nn.Module):
    """What a batch norm with extras applies after normalizing: ``act(drop(x))``.

    Holds the extras under their own attribute names (``drop``, ``act``), so the parameters of an
    activation such as ``PReLU`` keep their state_dict keys (``<bn>.act.weight``) when the batch
    norm itself is folded away.

    Example::

        >>> after = AfterNorm(act=nn.SiLU())
        >>> y = after(torch.randn(2, 4))        # silu(x)
    """

    def __init__(self, **extras: nn.Module) -> None:
        super().__init__()
        for name, m in extras.items():
            setattr(self, name, m)

    def forward(self, x: Tensor) -> Tensor:
        for m in self.children():
            x = m(x)
        return x


@dataclass(frozen=True)
class BNKind:
    """What one batch norm is (see the module docstring).

    ``frozen``: fixed statistics by design. ``extras``: ``((attribute, module), ...)`` applied after the
    normalization, in order (the module's own objects). ``activation``: the string activation of this
    library's ``BatchNormAct*d`` (``None`` otherwise). ``takes_residual``: ``forward(x, residual)``
    adds a residual before the extras. ``problem``: ``None`` if the eval forward is exactly
    ``extras(BN(x))``, else why not.
    """

    frozen: bool
    extras: Tuple[Tuple[str, nn.Module], ...] = ()
    activation: Optional[str] = None
    takes_residual: bool = False
    problem: Optional[str] = None

    @property
    def has_extras(self) -> bool:
        """Whether anything but ``nn.Identity`` follows the normalization."""
        return any(type(m) is not nn.Identity for _, m in self.extras)

    @property
    def plain(self) -> bool:
        """Eval forward is exactly the batch norm: no extras and no problem."""
        return self.problem is None and not self.has_extras

    def describe_extras(self) -> str:
        """E.g. ``"drop=Dropout(p=0.2), act=SiLU()"`` (identities left out)."""
        return ", ".join(f"{a}={m!r}".replace("\n", " ") for a, m in self.extras if type(m) is not nn.Identity)

    def after(self, copy_modules: bool = False) -> Optional[nn.Module]:
        """The extras as one module (:class:`AfterNorm`), ``None`` if there are none.

        With ``copy_modules`` they are deep copies, else the batch norm's own objects.
        """
        if not self.has_extras:
            return None
        return AfterNorm(**{a: copy.deepcopy(m) if copy_modules else m for a, m in self.extras})


def attach_extras(new: nn.Module, extras, *, copy_modules: bool = True) -> None:
    """Make batch norm ``new`` apply exactly ``extras`` (``((attribute, module), ...)``) after normalizing.

    ``new`` built like timm's (``.drop``/``.act`` modules) gets the modules (deep copies with
    ``copy_modules``), ``nn.Identity`` where ``extras`` has none; this library's ``BatchNormAct*d``
    with a string ``activation`` gets the matching string (dropout must then be an identity). Raises
    ``ValueError`` (``new`` unchanged) when ``new`` cannot express them, e.g. a plain
    ``torch.nn.BatchNorm2d`` asked to hold a ``SiLU``.

    Example::

        >>> bn = batchnorm.BatchNormAct2d(4)              # activation="relu"
        >>> attach_extras(bn, (("act", nn.SiLU()),))     # now bn.activation == "silu"
    """
    extras = dict(extras)
    real = {a: m for a, m in extras.items() if type(m) is not nn.Identity}
    unknown = set(extras) - {"drop", "act"}
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)}; only 'drop' and 'act' are understood")
    slots = [a for a in ("drop", "act") if isinstance(getattr(new, a, None), nn.Module)]
    if slots:
        missing = set(real) - set(slots)
        if missing:
            raise ValueError(f"{type(new).__name__} has no place for {sorted(missing)}")
        for a in slots:
            m = extras.get(a)
            setattr(new, a, nn.Identity() if m is None else (copy.deepcopy(m) if copy_modules else m))
        return
    if isinstance(getattr(new, "activation", None), str):
        if "drop" in real:
            raise ValueError(f"{type(new).__name__} (string activation) has no place for dropout {real['drop']!r}")
        name = activation_name(real.get("act"))  # ValueError when not expressible
        new.activation = "identity" if name is None else name
        return
    if real:
        raise ValueError(f"{type(new).__name__} has no place for " + ", ".join(f"{a}={m!r}" for a, m in real.items()))


def _extras_of(m: nn.Module) -> Tuple[Tuple[Tuple[str, nn.Module], ...], Optional[str], Optional[str]]:
    """``(extras, string activation, problem)`` from the module's structure."""
    found = tuple((a, getattr(m, a)) for a in ("drop", "act") if isinstance(getattr(m, a, None), nn.Module))
    if found:
        return found, None, None
    act = getattr(m, "activation", None)
    if act is None:
        return (), None, None
    if isinstance(act, str):
        try:
            mod = activation_module(act)
        except ValueError as err:
            return (), act, str(err)
        return ((("act", mod),) if mod is not None else ()), act, None
    if isinstance(act, nn.Module):
        return (("act", act),), None, None
    return (), None, f"its 'activation' attribute is a {type(act).__name__}, which this library cannot interpret"


def _probe_shapes(m: nn.Module, c: int):
    d = bn_dims(m)
    ranks = {1: (3, 2), 2: (4,), 3: (5,)}.get(d, (4, 3, 2, 5))
    return [(3, c) + (3,) * (r - 2) for r in ranks]


def _check_forward(m: nn.Module, extras, takes_residual: bool) -> Optional[str]:
    """Run a float64 eval-mode copy of ``m`` on a small input; ``None`` if it equals ``extras(BN(x))``."""
    if not has_running_stats(m) and not isinstance(m, _TorchBatchNorm):
        return "it has no running statistics to check its forward against"
    try:
        probe = copy.deepcopy(m).to("cpu", torch.float64).eval()
    except Exception as err:  # e.g. meta tensors, exotic buffers
        return f"its forward cannot be checked ({type(err).__name__}: {err})"
    c = num_channels(m)
    gen = torch.Generator().manual_seed(0)
    last = None
    for shape in _probe_shapes(m, c):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3
        r = torch.randn(shape, generator=gen, dtype=torch.float64) if takes_residual else None
        try:
            with torch.no_grad():
                got = probe(x.clone()) if r is None else probe(x.clone(), residual=r.clone())
        except Exception as err:  # wrong rank for this class: try the next one
            last = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            continue
        with torch.no_grad():
            rm = probe.running_mean if has_running_stats(probe) else None
            rv = probe.running_var if has_running_stats(probe) else None
            w, b = getattr(probe, "weight", None), getattr(probe, "bias", None)
            eps = float(getattr(probe, "eps", 1e-5))
            want = torch.nn.functional.batch_norm(x, rm, rv, w, b, rm is None, 0.0, eps)
            if r is not None:
                want = want + r
            for a, _ in extras:
                want = getattr(probe, a)(want) if a in dict(probe.named_children()) else dict(extras)[a](want)
        if not isinstance(got, Tensor) or got.shape != want.shape:
            return f"its forward returns {type(got).__name__} {tuple(getattr(got, 'shape', ()))}, not the input's shape"
        diff = (got - want).nan_to_num(0.0).norm() / want.nan_to_num(0.0).norm().clamp_min(1e-300)
        if bool(torch.isnan(got).ne(torch.isnan(want)).any()) or float(diff) > PROBE_TOL:
            what = "batch norm" + (f" followed by {', '.join(a for a, _ in extras)}" if extras else "")
            return (f"its forward does not compute {what} (relative difference {float(diff):.2g} on a test input); "
                    f"it does something this library does not know")  # fmt: skip
        return None
    return f"its forward could not be run on a test input ({last})"


def kind_of(m: nn.Module) -> BNKind:
    """Describe batch norm ``m``: frozen or not, its extras, and whether its forward is understood.

    Raises ``TypeError`` if ``m`` is not a batch norm (:func:`is_batchnorm`).

    Example::

        >>> class BNAct(torch.nn.BatchNorm2d):                       # built like timm's BatchNormAct2d
        ...     def __init__(self, c):
        ...         super().__init__(c); self.drop, self.act = torch.nn.Identity(), torch.nn.SiLU()
        ...     def forward(self, x):
        ...         return self.act(self.drop(super().forward(x)))
        >>> k = kind_of(BNAct(4))
        >>> k.has_extras, k.describe_extras(), k.problem
        (True, 'act=SiLU()', None)
    """
    if not is_batchnorm(m):
        raise TypeError(f"{type(m).__name__} is not a batch norm")
    frozen = is_frozen(m)
    extras, act, problem = _extras_of(m)
    try:
        takes_residual = "residual" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        takes_residual = False
    if problem is None and (extras or act is not None or type(m).forward not in _plain_forwards()):
        problem = _check_forward(m, extras, takes_residual)
    return BNKind(frozen=frozen, extras=extras, activation=act, takes_residual=takes_residual, problem=problem)


def batchnorm_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every batch norm in ``model``, in registration order.

    A batch norm's own children (e.g. its ``.act``) are not searched.
    """
    out, skip = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") or p == "" for p in skip) and name != "":
            continue
        if is_batchnorm(m):
            out.append((name, m))
            skip.append(name)
    return out
