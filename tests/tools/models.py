"""Small models shared by the tools tests (also used as CLI factories: ``tests.tools.models:convnet``)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine so folding/eval really matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm = getattr(m, "running_mean", None)
            if isinstance(rm, torch.Tensor):
                c = rm.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor):
                    m.num_batches_tracked.fill_(10)
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


class ConvNet(nn.Module):
    """The seeds' ConvNet: (conv-BN-ReLU-pool) x2, (Linear-BN-ReLU) x2, Linear; 3x16x16 input."""

    def __init__(self, bn=nn.BatchNorm2d, bn1d=nn.BatchNorm1d, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), bn1d(32), nn.ReLU(),
            nn.Linear(32, 24), bn1d(24), nn.ReLU(), nn.Linear(24, classes),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; ``downsample`` adds a strided 1x1 conv + BN on the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    """Stem, two residual blocks, then BN after the residual add (not foldable), a BN whose
    conv output also feeds a second branch (not foldable), and a BN before a 1x1 conv (folds forward)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 12, stride=2)
        self.post_add_bn = nn.BatchNorm2d(12)  # follows relu(add): stays
        self.branch = nn.Conv2d(12, 12, 3, padding=1)
        self.branch_bn = nn.BatchNorm2d(12)  # branch output also used raw: stays
        self.pre_bn = nn.BatchNorm2d(12)  # feeds a 1x1 conv: folds into it
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.post_add_bn(self.block2(self.block1(x)))
        b = self.branch(x)
        x = self.branch_bn(b) + b
        return self.head(self.pre_bn(x)).mean((2, 3))


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: torch.fx fails; the Sequentials inside still fold."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.a(x)
        if float(y.detach().mean()) > 1e9:  # never true, but fx cannot know
            y = y * 2
        return self.b(y)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ConvNet(), 1).eval()


def other_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def broken_factory():
    raise RuntimeError("factory failure")
