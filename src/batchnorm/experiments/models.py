"""The small networks the experiments train, each with a switchable normalization and initialisation.

Every model takes ``norm`` - one of :data:`NORMS` - and inserts that layer between
each linear/conv map and its nonlinearity (the paper's placement: ``y = g(BN(Wu))``).
Both arms of a comparison are the *same class* with only ``norm`` changed; the
normalization layers consume no random numbers, so with the same seed both arms start
from the same weights.

Initialisations (``init``):

* ``"glorot"`` - Glorot/Xavier uniform, ``W ~ U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``,
  biases 0: the standard for sigmoid/tanh networks;
* ``"kaiming"`` - He normal, ``W ~ N(0, 2 / fan_in)``, biases 0: the standard for ReLU;
* ``("normal", s)`` - ``W ~ N(0, s^2)``, biases 0: "small random Gaussian values", the
  setting of the paper's MNIST experiment (which does not state ``s``; 0.01 is used);
* ``"torch"`` - PyTorch's default ``nn.Linear``/``nn.Conv2d`` init.

The normalization layers are this library's public classes (``batchnorm.BatchNorm1d``
and friends).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import batchnorm

__all__ = ["MLP", "NORMS", "ConvNet", "init_weights", "norm_layer", "scale_weights"]

#: normalization kinds a model accepts
NORMS = ("none", "bn", "renorm", "ghost", "group", "layer", "instance")

#: human-readable names (reports, legends)
NORM_LABELS = {"none": "no normalization", "bn": "batch norm", "renorm": "batch renorm", "ghost": "ghost BN",
               "group": "group norm", "layer": "layer norm", "instance": "instance norm", "sync": "SyncBatchNorm"}


def norm_layer(kind: str, channels: int, dims: int, *, spatial: Sequence[int] = (), eps: float = 1e-5,
               momentum: float | None = 0.1, ghost_batch: int = 8, groups: int = 4,
               renorm_steps: int | None = None) -> nn.Module:
    """A normalization layer for ``channels`` features: ``dims=1`` for ``(N, C)``, ``2`` for ``(N, C, H, W)``.

    ``"none"`` gives ``nn.Identity``; ``"ghost"`` uses virtual batches of ``ghost_batch``
    samples (the caller caps it at the batch size); ``"group"`` uses ``min(groups, C)``
    groups; ``"layer"`` normalizes each sample over ``(C, *spatial)`` (``spatial`` is
    ``(H, W)`` for ``dims=2``); ``"instance"`` is defined for ``dims=2`` only (one value
    per feature has no per-sample statistics). ``"renorm"`` relaxes ``r_max``/``d_max``
    from plain BN to 3 / 5 over a training run of ``renorm_steps`` steps (the paper's
    schedule shape, :class:`batchnorm.RenormSchedule`: warm-up 10%, ``d_max`` reached at
    35%, ``r_max`` at 60%); without ``renorm_steps`` the limits are 3 / 5 from the start.

    Example::

        >>> norm_layer("bn", 100, 1)
        BatchNorm1d(100, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """
    if kind == "none":
        return nn.Identity()
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 (features) or 2 (feature maps), got {dims}")
    d = f"{dims}d"
    if kind == "bn":
        return getattr(batchnorm, f"BatchNorm{d}")(channels, eps=eps, momentum=momentum)
    if kind == "renorm":
        if renorm_steps:
            s = batchnorm.RenormSchedule(warmup=max(1, renorm_steps // 10), r_max_steps=max(2, renorm_steps * 6 // 10),
                                         d_max_steps=max(2, renorm_steps * 35 // 100))
            return getattr(batchnorm, f"BatchRenorm{d}")(channels, eps=eps, momentum=momentum, r_max=s.r_max,
                                                         d_max=s.d_max)
        return getattr(batchnorm, f"BatchRenorm{d}")(channels, eps=eps, momentum=momentum)
    if kind == "ghost":
        return getattr(batchnorm, f"GhostBatchNorm{d}")(channels, eps=eps, momentum=momentum,
                                                         virtual_batch_size=ghost_batch)
    if kind == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return batchnorm.GroupNorm(g, channels, eps=eps)
    if kind == "layer":
        return batchnorm.LayerNorm([channels, *spatial] if dims == 2 else channels, eps=eps)
    if kind == "instance":
        if dims != 2:
            raise ValueError("instance norm needs feature maps (dims=2): a single feature has no per-sample "
                             "statistics")
        return batchnorm.InstanceNorm2d(channels, eps=eps, affine=True)
    raise ValueError(f"unknown normalization {kind!r}; choose one of {NORMS}")


@torch.no_grad()
def init_weights(model: nn.Module, init) -> None:
    """Initialise every ``nn.Linear``/``nn.Conv2d`` of ``model`` in place (see the module docstring for ``init``)."""
    if init == "torch":
        return
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if init == "glorot":
            nn.init.xavier_uniform_(m.weight)
        elif init == "kaiming":
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(init, (tuple, list)) and len(init) == 2 and init[0] == "normal":
            nn.init.normal_(m.weight, 0.0, float(init[1]))
        else:
            raise ValueError(f"unknown init {init!r}; use 'glorot', 'kaiming', ('normal', std) or 'torch'")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_ACTS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class MLP(nn.Module):
    r"""Fully connected net: ``x -> [Linear -> norm -> act (-> dropout)] * len(hidden) -> Linear``.

    Args:
        n_in: input features (images are flattened).
        hidden: widths of the hidden layers, e.g. ``(100, 100, 100)`` (the paper's MNIST net).
        n_out: classes.
        norm: one of ``"none"``, ``"bn"``, ``"renorm"``, ``"ghost"``, ``"group"``, ``"layer"``.
        activation: ``"sigmoid"`` or ``"relu"``.
        init: ``"glorot"``, ``"kaiming"``, ``("normal", std)`` or ``"torch"``.
        bias: whether the hidden ``Linear`` layers have a bias (the classifier always has one).
        dropout: dropout probability after each hidden activation (0: none).
        eps, momentum: passed to the normalization layers.

    :meth:`forward` with ``return_preacts=True`` also returns the inputs to each
    nonlinearity (after normalization), shape ``(N, hidden[i])`` each - what the
    paper's Figure 1(b,c) tracks.

    Example::

        >>> net = MLP(64, (100, 100, 100), 10, norm="bn", init="glorot")
        >>> logits = net(torch.rand(60, 1, 8, 8))
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, norm: str = "none",
                 activation: str = "sigmoid", init="torch", bias: bool = True, dropout: float = 0.0,
                 eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        widths = [n_in, *hidden]
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(norm_layer(norm, b, 1, eps=eps, momentum=momentum) for b in hidden)
        self.act = _ACTS[activation]()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(widths[-1], n_out)
        init_weights(self, init)

    def forward(self, x: Tensor, return_preacts: bool = False):
        h = x.flatten(1)
        preacts = []
        for lin, norm in zip(self.linears, self.norms):
            z = norm(lin(h))
            preacts.append(z)
            h = self.drop(self.act(z))
        out = self.head(h)
        return (out, preacts) if return_preacts else out


class ConvNet(nn.Module):
    """The seeds' ConvNet: ``[Conv3x3 -> norm -> ReLU -> MaxPool2] * len(channels) -> [Linear -> norm -> ReLU] * len(fc) -> Linear``.

    Args:
        image_shape: ``(C, H, W)`` of the input (``H`` and ``W`` divisible by ``2**len(channels)``).
        n_out: classes.
        norm: normalization after the convolutions (one of :data:`NORMS`).
        fc_norm: normalization after the hidden linears; default ``norm``, except that
            ``"instance"`` (undefined for single features) falls back to ``"none"``.
        channels: conv widths; fc: hidden linear widths (``()`` for none).
        init: as for :class:`MLP` (``"kaiming"`` is the standard for ReLU).
        ghost_batch, groups, renorm_steps, momentum: passed to :func:`norm_layer`.

    Example::

        >>> net = ConvNet((1, 8, 8), 10, norm="bn")
        >>> net(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, image_shape: Sequence[int], n_out: int, norm: str = "none", fc_norm: str | None = None,
                 channels: Sequence[int] = (16, 32), fc: Sequence[int] = (128, 64), init="torch",
                 momentum: float | None = 0.1, ghost_batch: int = 8, groups: int = 4,
                 renorm_steps: int | None = None) -> None:
        super().__init__()
        if fc_norm is None:
            fc_norm = "none" if norm == "instance" else norm
        c, h, w = image_shape
        kw = {"momentum": momentum, "ghost_batch": ghost_batch, "groups": groups, "renorm_steps": renorm_steps}
        layers: list[nn.Module] = []
        for out_c in channels:
            layers += [nn.Conv2d(c, out_c, 3, padding=1), norm_layer(norm, out_c, 2, spatial=(h, w), **kw),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out_c, h // 2, w // 2
        layers.append(nn.Flatten())
        d = c * h * w
        for width in fc:
            layers += [nn.Linear(d, width), norm_layer(fc_norm, width, 1, **kw), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, n_out))
        self.body = nn.Sequential(*layers)
        init_weights(self, init)

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
