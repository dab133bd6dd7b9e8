"""A small zoo of correctly built networks for the doctor (32x32 inputs, CPU-sized): the layer patterns of
ResNet, MobileNetV2 (depthwise), EfficientNet (SiLU, squeeze-excite, timm-style BNAct) and DenseNet
(concatenation), each with bias-free convolutions before its batch norms; and the images they see.
The last feature maps are 2x2 (MobileNet, EfficientNet) and 4x4 (ResNet): few values per channel,
where batch statistics are noisiest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import timm_like as T


def images(n: int, seed: int) -> torch.Tensor:
    """``(n, 3, 32, 32)`` spatially correlated images: smooth 8x8 noise upsampled, plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    return F.interpolate(coarse, size=32, mode="bilinear", align_corners=False) + 0.3 * torch.randn(
        n, 3, 32, 32, generator=g
    )


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1, act=None))
        self.short = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layers = nn.Sequential(Basic(16, 16, 1), Basic(16, 32, 2), Basic(32, 64, 2), Basic(64, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=3):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1, act=nn.ReLU6), conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU6),
            conv_bn(mid, cout, 1, act=None),
        )  # fmt: skip
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.ReLU6), InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24, 1), InvertedResidual(24, 32, 2), InvertedResidual(32, 48, 2),
            conv_bn(48, 96, 1, act=nn.ReLU6),
        )  # fmt: skip
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """EfficientNet's block with timm-style BN+SiLU modules (activation in .act)."""

    def __init__(self, cin, cout, stride, expand=4):
        super().__init__()
        mid = cin * expand
        self.pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = T.BatchNormAct2d(mid, act_layer=nn.SiLU)
        self.dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = T.BatchNormAct2d(mid, act_layer=nn.SiLU)
        self.se = SqueezeExcite(mid)
        self.pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = T.BatchNormAct2d(cout, apply_act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.bn3(self.pwl(self.se(self.bn2(self.dw(self.bn1(self.pw(x)))))))
        return x + y if self.residual else y


class EfficientNetStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), T.BatchNormAct2d(16, act_layer=nn.SiLU))
        self.blocks = nn.Sequential(MBConv(16, 16, 1), MBConv(16, 24, 2), MBConv(24, 40, 2), MBConv(40, 40, 1),
                                    MBConv(40, 64, 2))  # fmt: skip
        self.head = nn.Sequential(nn.Conv2d(64, 128, 1, bias=False), T.BatchNormAct2d(128, act_layer=nn.SiLU))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )  # fmt: skip

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNetStyle(nn.Module):
    def __init__(self, growth=8):
        super().__init__()
        layers, c = [nn.Conv2d(3, 16, 3, padding=1, bias=False)], 16
        for block in range(3):
            for _ in range(3):
                layers.append(DenseLayer(c, growth))
                c += growth
            if block < 2:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


ZOO = {"resnet": ResNetLike, "mobilenet": MobileNetStyle, "efficientnet": EfficientNetStyle, "densenet": DenseNetStyle}
