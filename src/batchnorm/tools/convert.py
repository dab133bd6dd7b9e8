"""Swap batch-norm flavours in a model, keeping every value that carries over.

:func:`convert` replaces each batch norm of a model (torch.nn's, this library's, or a
variant) by another flavour: ``"torch"`` (``torch.nn.BatchNorm{1,2,3}d``), ``"batchnorm"``
(this library's drop-ins), ``"act"`` (``BatchNormAct*d``), ``"renorm"``, ``"ghost"``,
``"frozen"``, ``"sync"`` (this library's ``SyncBatchNorm``), ``"torch_sync"``
(``torch.nn.SyncBatchNorm``) or ``"groupnorm"``. The BN flavours share the parameter and buffer
names of ``torch.nn.BatchNorm2d``, so ``weight``, ``bias``, ``running_mean``, ``running_var``
and ``num_batches_tracked`` are copied value for value, along with ``eps``, ``momentum``,
``affine``, ``track_running_stats``, dtype, device, the training flag and ``requires_grad``.
Group norm keeps ``weight``/``bias`` and has no running statistics (they are dropped).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Optional

import torch
from torch import nn

from ..nn.kinds import (
    attach_extras,
    batchnorm_modules,
    bn_dims,
    copy_norm_values,
    has_running_stats,
    kind_of,
    num_channels,
)
from ._graph import set_submodule

__all__ = ["convert", "TARGETS"]

#: ``to=`` name -> (module, class name pattern; ``{d}`` is the 1/2/3 flavour)
TARGETS = {
    "torch": ("torch.nn", "BatchNorm{d}d"),
    "batchnorm": ("batchnorm", "BatchNorm{d}d"),
    "act": ("batchnorm", "BatchNormAct{d}d"),
    "renorm": ("batchnorm", "BatchRenorm{d}d"),
    "ghost": ("batchnorm", "GhostBatchNorm{d}d"),
    "frozen": ("batchnorm", "FrozenBatchNorm{d}d"),  # built by batchnorm.freeze, which also keeps extras
    "sync": ("batchnorm", "SyncBatchNorm"),
    "torch_sync": ("torch.nn", "SyncBatchNorm"),
    "groupnorm": ("batchnorm", "GroupNorm"),
}



def _target_class(to: str, d: Optional[int], where: str):
    mod_name, pattern = TARGETS[to]
    if "{d}" in pattern and d is None:
        raise ValueError(
            f"convert: cannot tell whether '{where}' is a 1d, 2d or 3d batch norm (it is dimension-agnostic); "
            f"pass dim=1, 2 or 3"
        )
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(f"convert: to={to!r} needs {mod_name}, which is not available here ({err})") from err
    name = pattern.format(d=d)
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"convert: to={to!r} needs {mod_name}.{name}, which does not exist in this version")
    return cls


def _accepts(cls) -> set:
    params = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        params |= {p for p in sig.parameters if p not in ("self", "args", "kwargs")}
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


def _frozen_one(src: nn.Module, name: str, kwargs: dict) -> nn.Module:
    """``to="frozen"``: exactly what :func:`batchnorm.freeze` makes of this module."""
    from ..nn.frozen import freeze

    if kwargs:
        raise ValueError(f"convert: to='frozen' takes no options, got {sorted(kwargs)}")
    try:
        return freeze(src)
    except ValueError as err:
        raise ValueError(f"convert: '{name}': {err}") from err


@torch.no_grad()
def _convert_one(src: nn.Module, name: str, to: str, dim: Optional[int], kwargs: dict) -> nn.Module:
    c = num_channels(src)
    if to == "frozen":
        if not has_running_stats(src):
            raise ValueError(
                f"convert: '{name}' has track_running_stats=False, so there are no statistics to freeze; "
                f"recalibrate it first or leave it trainable. Nothing was changed."
            )
        return _frozen_one(src, name, kwargs)
    kind = kind_of(src)
    if kind.problem is not None:
        raise ValueError(
            f"convert: '{name}' ({type(src).__name__}) cannot be converted without changing what it computes: "
            f"{kind.problem}. Nothing was changed; replace it by hand."
        )
    d = dim if dim is not None else bn_dims(src)
    cls = _target_class(to, d, name)
    ref = src.running_mean if has_running_stats(src) else getattr(src, "weight", None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    accepted = _accepts(cls)
    settings = {
        "eps": getattr(src, "eps", 1e-5),
        "momentum": getattr(src, "momentum", 0.1),
        "affine": getattr(src, "affine", getattr(src, "weight", None) is not None),
        "track_running_stats": has_running_stats(src),
    }
    if to == "groupnorm":
        g = kwargs.get("num_groups")
        if g is None:
            raise ValueError("convert: to='groupnorm' needs num_groups=G (a divisor of each layer's channel count)")
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g:
            raise ValueError(
                f"convert: num_groups={g!r} does not divide the {c} channels of '{name}'; choose a divisor of {c} "
                f"(e.g. {next(k for k in (32, 16, 8, 4, 2, 1) if c % k == 0)}). Nothing was changed."
            )
        settings["num_channels"] = c
        settings.pop("track_running_stats")
        settings.pop("momentum")
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"convert: {cls.__name__} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    init = {k: v for k, v in settings.items() if k in accepted}
    init.update(kwargs)
    init.update({k: v for k, v in factory.items() if k in accepted})
    try:
        new = cls(**init) if to == "groupnorm" else cls(c, **{k: v for k, v in init.items() if k != "num_features"})
    except (TypeError, ValueError) as err:
        raise ValueError(f"convert: cannot build {cls.__name__} for '{name}' ({type(src).__name__}): {err}") from err
    try:
        attach_extras(new, kind.extras, copy_modules=True)
    except ValueError as err:
        raise ValueError(
            f"convert: '{name}' ({type(src).__name__}) applies {kind.describe_extras()} after normalizing, which "
            f"to={to!r} cannot hold ({err}); convert with to='act' or to='frozen', or replace the layer by hand. "
            f"Nothing was changed."
        ) from err
    copy_norm_values(src, new)
    new.train(src.training)
    return new


def convert(model: nn.Module, to: str, *, dim: Optional[int] = None, **kwargs) -> nn.Module:
    r"""Return a copy of ``model`` with every batch norm replaced by the flavour ``to``.

    The eval-mode function is unchanged for every BN flavour (all compute
    ``weight * (x - running_mean) / sqrt(running_var + eps) + bias``); training behaviour is
    the new flavour's. ``kwargs`` go to the new class (``r_max=``, ``d_max=`` for ``"renorm"``,
    ``virtual_batch_size=`` for ``"ghost"``, ``num_groups=`` for ``"groupnorm"``,
    ``process_group=`` for the sync flavours). ``dim`` picks 1/2/3 for dimension-agnostic
    sources (``SyncBatchNorm``). The input model is never mutated; all layers are converted
    on the copy before it is returned, so a refusal leaves nothing half-done.

    Raises ``ValueError`` with the layer's name when a layer cannot be converted: an unknown
    ``to``, a group count that does not divide the channels, freezing a BN without running
    statistics, an activation/dropout the target cannot hold, a forward this library cannot describe
    (:func:`batchnorm.nn.kinds.kind_of`), a target module not installed.

    Batch norms with extras (an activation in ``.act`` and dropout in ``.drop``, as timm's
    ``BatchNormAct2d``; or this library's ``BatchNormAct*d``) keep them: ``to="act"`` carries
    them over (as modules, or as the string activation where that is what the target takes),
    ``to="frozen"`` gives a ``FrozenBatchNormAct*d``; targets with no place for them refuse.

    Shapes: the converted layers take the same ``(N, C, *)`` inputs.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> ours = convert(model, to="batchnorm")            # batchnorm.nn.BatchNorm2d, same values
        >>> gn = convert(model, to="groupnorm", num_groups=4)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not isinstance(to, str) or to not in TARGETS:
        raise ValueError(f"convert: unknown to={to!r}; choose one of {sorted(TARGETS)}")
    if dim is not None and dim not in (1, 2, 3):
        raise ValueError(f"convert: dim must be 1, 2 or 3, got {dim!r}")
    new = copy.deepcopy(model)
    targets = batchnorm_modules(new)
    if any(name == "" for name, _ in targets):
        return _convert_one(new, type(model).__name__, to, dim, kwargs)
    converted = [(name, _convert_one(bn, name, to, dim, kwargs)) for name, bn in targets]
    for name, m in converted:
        set_submodule(new, name, m)
    return new
