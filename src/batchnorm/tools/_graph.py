"""The data flow around each batch norm: which Conv/Linear feeds (or is fed by) it exclusively.

Which modules are batch norms, and what they apply after normalizing, is decided in one place:
:mod:`batchnorm.nn.kinds`.

Two ways to see the data flow:

1. a ``torch.fx`` symbolic trace (batch norms and torch.nn layers are kept as
   leaves), which sees residual branches and every consumer of a tensor;
2. where a module does not trace (data-dependent control flow), its children are
   analysed one by one, and the children of an ``nn.Sequential`` are chained in
   order (in a Sequential the only consumer of a child's output is the next child).

Nothing here mutates the model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..nn.kinds import batchnorm_modules, is_batchnorm

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: layers a batch norm can be folded into when they feed it
PRODUCERS = _CONV + _CONV_T + (nn.Linear,)


@dataclass
class BNSite:
    """One batch norm and its neighbours in the data flow.

    ``prev``/``next`` are qualified module names of the Conv/Linear that feeds it / that it
    feeds (``None`` if there is none or it is not a Conv/Linear). ``prev_exclusive`` says the
    producer's output goes to this BN only; ``next_exclusive`` says the BN's output goes to
    the consumer only. ``note`` explains why no neighbour was found.
    """

    name: str
    prev: Optional[str] = None
    prev_exclusive: bool = False
    next: Optional[str] = None
    next_exclusive: bool = False
    prev_kind: str = ""  # what feeds the BN, in words ("conv1", "relu", "add", "input", ...)
    note: str = ""
    how: str = "fx"  # "fx" or "sequential" or "none"


@dataclass
class Analysis:
    sites: Dict[str, BNSite] = field(default_factory=dict)
    trace_errors: Dict[str, str] = field(default_factory=dict)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_batchnorm(m) or isinstance(m, PRODUCERS):
            return True
        # this library's modules (norms, fused layers) are opaque layers, like torch.nn's
        if type(m).__module__.startswith("batchnorm.") and not isinstance(m, nn.Sequential):
            return True
        return super().is_leaf_module(m, qualname)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _describe(node) -> str:
    if not isinstance(node, torch.fx.Node):
        return type(node).__name__
    if node.op == "placeholder":
        return "the model input"
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)}()"
    return node.op


def analyse(model: nn.Module) -> Analysis:
    """Find every batch norm in ``model`` and its exclusive Conv/Linear neighbours."""
    out = Analysis()
    _analyse(model, "", out)
    for name, m in batchnorm_modules(model):
        if name not in out.sites:
            out.sites[name] = BNSite(name, how="none", note="inside a module that torch.fx cannot trace")
    return out


def _analyse(module: nn.Module, prefix: str, out: Analysis) -> None:
    if is_batchnorm(module) or isinstance(module, PRODUCERS):
        return
    try:
        gm = torch.fx.GraphModule(module, _Tracer().trace(module))
    except Exception as err:  # any trace failure means: look inside
        out.trace_errors[prefix or "<model>"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if isinstance(module, nn.Sequential):
            _sequential_sites(module, prefix, out)
        for name, child in module.named_children():
            _analyse(child, _join(prefix, name), out)
        return
    _fx_sites(gm, module, prefix, out)


def _fx_sites(gm: torch.fx.GraphModule, module: nn.Module, prefix: str, out: Analysis) -> None:
    mods = dict(module.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]

    def used_once(target: str) -> bool:
        return calls[target] == 1 and not any(a == target or a.startswith(target + ".") for a in attrs)

    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_batchnorm(mods[node.target]):
            continue
        site = BNSite(_join(prefix, node.target), how="fx")
        out.sites[site.name] = site
        if not used_once(node.target):
            site.note = "the BN module is called more than once"
            continue
        if len(node.args) != 1 or node.kwargs:
            site.note = "the BN is called with extra arguments (e.g. a fused residual)"
            continue
        src = node.args[0] if node.args else None
        site.prev_kind = _describe(src)
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(mods[src.target], PRODUCERS):
            site.prev = _join(prefix, src.target)
            site.prev_exclusive = len(src.users) == 1 and used_once(src.target)
        if len(node.users) == 1:
            (user,) = node.users
            if (
                user.op == "call_module"
                and isinstance(mods[user.target], _CONV + (nn.Linear,))
                and user.args
                and user.args[0] is node
            ):
                site.next = _join(prefix, user.target)
                site.next_exclusive = used_once(user.target)


def _sequential_sites(seq: nn.Sequential, prefix: str, out: Analysis) -> None:
    children = list(seq.named_children())
    for i, (name, m) in enumerate(children):
        if not is_batchnorm(m):
            continue
        site = BNSite(_join(prefix, name), how="sequential")
        out.sites[site.name] = site
        if i > 0:
            pname, pm = children[i - 1]
            site.prev_kind = f"module '{_join(prefix, pname)}'"
            if isinstance(pm, PRODUCERS):
                site.prev, site.prev_exclusive = _join(prefix, pname), True
        else:
            site.prev_kind = "the Sequential's input"
        if i + 1 < len(children):
            nname, nm = children[i + 1]
            if isinstance(nm, _CONV + (nn.Linear,)):
                site.next, site.next_exclusive = _join(prefix, nname), True


def shared_objects(model: nn.Module) -> Tuple[set, set]:
    """Ids of modules and of parameters registered at more than one place in ``model``."""
    mod_count = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    par_count = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {k for k, v in mod_count.items() if v > 1}, {k for k, v in par_count.items() if v > 1}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
