"""Model factories for the fault tests (``tests.faults.factories:NAME``)."""

from __future__ import annotations

import sys

import torch
from torch import nn


def small() -> nn.Module:
    """conv-BN-ReLU-conv-BN with trained-looking statistics; 3x8x8 input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False),
                          nn.BatchNorm2d(2))  # fmt: skip
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.num_batches_tracked.fill_(5)
    return model.eval()


def exits_zero():
    sys.exit(0)


def exits_with_message():
    raise SystemExit("factory gave up")


def raises_key_error():
    raise KeyError("no such weights")


def not_a_module():
    return {"weights": 1}


class Weird(nn.Module):
    """A model whose forward raises an exception type no command expects."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        raise LookupError("weird failure deep inside the model")


def weird():
    return Weird()


NOT_CALLABLE = 3
