"""The small networks the experiments train, each with a switchable normalization.

Every model takes ``norm`` - one of :data:`NORMS` - and inserts that layer between
each linear/conv map and its nonlinearity (the paper's placement: ``y = g(BN(Wu))``).
Both arms of a comparison are the *same class* with only ``norm`` changed, so they
share initialisation code, widths and nonlinearities.

The normalization layers come from this library: :class:`batchnorm.BatchNorm1d` /
``2d`` for ``"bn"``, and - imported lazily, because they live in other modules -
batch renorm, ghost batch norm and group norm for the small-batch experiment.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "NORMS", "ConvNet", "norm_available", "norm_layer", "scale_weights"]

#: normalization kinds a model accepts
NORMS = ("none", "bn", "renorm", "ghost", "group")

# kind -> (module, class name for 1-D features, class name for 2-D maps)
_FAMILY = {
    "bn": ("batchnorm.nn.batchnorm", "BatchNorm1d", "BatchNorm2d"),
    "renorm": ("batchnorm.nn.renorm", "BatchRenorm1d", "BatchRenorm2d"),
    "ghost": ("batchnorm.nn.ghost", "GhostBatchNorm1d", "GhostBatchNorm2d"),
    "group": ("batchnorm.nn.groupnorm", "GroupNorm", "GroupNorm"),
}


def norm_available(kind: str) -> bool:
    """Whether the module implementing ``kind`` is present in this installation."""
    if kind == "none":
        return True
    try:
        _norm_class(kind, 2)
        return True
    except ImportError:
        return False


def _norm_class(kind: str, dims: int):
    if kind not in _FAMILY:
        raise ValueError(f"unknown normalization {kind!r}; choose one of {NORMS}")
    module_name, cls1, cls2 = _FAMILY[kind]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, cls1 if dims == 1 else cls2)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"normalization {kind!r} needs {module_name} (not in this build): {err}") from err


def norm_layer(kind: str, channels: int, dims: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
               ghost_batch: int = 16, groups: int = 4) -> nn.Module:
    """A normalization layer for ``channels`` features: ``dims=1`` for ``(N, C)``, ``2`` for ``(N, C, H, W)``.

    ``"none"`` gives ``nn.Identity``; ``"ghost"`` uses virtual batches of ``ghost_batch``
    samples; ``"group"`` uses ``min(groups, channels)`` groups.

    Example::

        >>> norm_layer("bn", 100, 1)
        BatchNorm1d(100, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """
    if kind == "none":
        return nn.Identity()
    cls = _norm_class(kind, dims)
    if kind == "group":
        return cls(min(groups, channels), channels, eps=eps)
    if kind == "ghost":
        return cls(channels, eps=eps, momentum=momentum, virtual_batch_size=ghost_batch)
    return cls(channels, eps=eps, momentum=momentum)


_ACTS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class MLP(nn.Module):
    r"""Fully connected net: ``x -> [Linear -> norm -> act] * len(hidden) -> Linear``.

    Args:
        n_in: input features (images are flattened).
        hidden: widths of the hidden layers, e.g. ``(100, 100, 100)`` (the paper's MNIST net).
        n_out: classes.
        norm: ``"none"`` or ``"bn"`` (see :data:`NORMS`).
        activation: ``"sigmoid"`` or ``"relu"``.
        init_std: if given, weights ~ N(0, init_std^2) and biases 0 ("small Gaussian");
            otherwise PyTorch's default Linear init.
        eps, momentum: passed to the normalization layers.

    :meth:`forward` with ``return_preacts=True`` also returns the inputs to each
    nonlinearity (after normalization), shape ``(N, hidden[i])`` each - what the
    paper's Figure 1(b,c) tracks.

    Example::

        >>> net = MLP(64, (100, 100, 100), 10, norm="bn", init_std=0.01)
        >>> logits = net(torch.rand(60, 1, 8, 8))
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, norm: str = "none",
                 activation: str = "sigmoid", init_std: float | None = None, eps: float = 1e-5,
                 momentum: float | None = 0.1) -> None:
        super().__init__()
        widths = [n_in, *hidden]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(norm_layer(norm, b, 1, eps=eps, momentum=momentum) for b in hidden)
        self.act = _ACTS[activation]()
        self.head = nn.Linear(widths[-1], n_out)
        if init_std is not None:
            for lin in [*self.linears, self.head]:
                nn.init.normal_(lin.weight, 0.0, init_std)
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, return_preacts: bool = False):
        h = x.flatten(1)
        preacts = []
        for lin, norm in zip(self.linears, self.norms):
            z = norm(lin(h))
            preacts.append(z)
            h = self.act(z)
        out = self.head(h)
        return (out, preacts) if return_preacts else out


class ConvNet(nn.Module):
    """The seeds' ConvNet: ``[Conv3x3 -> norm -> ReLU -> MaxPool2] * len(channels) -> [Linear -> norm -> ReLU] * len(fc) -> Linear``.

    Args:
        image_shape: ``(C, H, W)`` of the input (``H`` and ``W`` divisible by ``2**len(channels)``).
        n_out: classes.
        norm: one of :data:`NORMS`; 2-D variant after convolutions, 1-D after hidden linears
            (``"group"`` uses :class:`GroupNorm` on both).
        channels: conv widths; fc: hidden linear widths (``()`` for none).

    Example::

        >>> net = ConvNet((1, 8, 8), 10, norm="bn")
        >>> net(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, image_shape: Sequence[int], n_out: int, norm: str = "none",
                 channels: Sequence[int] = (16, 32), fc: Sequence[int] = (128, 64),
                 momentum: float | None = 0.1, ghost_batch: int = 16) -> None:
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = []
        for out_c in channels:
            layers += [nn.Conv2d(c, out_c, 3, padding=1),
                       norm_layer(norm, out_c, 2, momentum=momentum, ghost_batch=ghost_batch),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out_c, h // 2, w // 2
        layers.append(nn.Flatten())
        d = c * h * w
        for width in fc:
            layers += [nn.Linear(d, width), norm_layer(norm, width, 1, momentum=momentum, ghost_batch=ghost_batch),
                       nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, n_out))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@torch.no_grad()
def scale_weights(model: MLP, k: float) -> None:
    """Multiply the weight matrix of every hidden layer of ``model`` by ``k`` in place.

    These are the matrices that feed a normalization in the BN arm, where
    ``BN((kW)u) = BN(Wu)`` (up to ``eps``); the classifier ``head`` is not scaled.
    """
    for lin in model.linears:
        lin.weight.mul_(k)
