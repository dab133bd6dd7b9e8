"""FrozenBatchNorm1d/2d/3d, freeze(model) and unfreeze(model)."""

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import reference as R
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze, unfreeze
from batchnorm.nn.ghost import GhostBatchNorm2d
from batchnorm.nn.renorm import BatchRenorm2d
from tolerances import LARGE_OFFSET_TOL, REL_TOL, REL_TOL_VS_TORCH, assert_rel_close

from ._util import assert_unchanged, data, np64, snapshot

F32 = REL_TOL[torch.float32]


def _trained(bn):
    """Give a batch norm non-trivial parameters and statistics."""
    c = bn.num_features
    g = torch.Generator().manual_seed(c)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.2)
        bn.num_batches_tracked.fill_(11)
    return bn


@pytest.mark.parametrize(
    "cls,shape",
    [
        (FrozenBatchNorm1d, (5, 3)),  # 2D input
        (FrozenBatchNorm1d, (2, 3, 7)),  # odd length
        (FrozenBatchNorm2d, (3, 4, 5, 2)),  # conv activation
        (FrozenBatchNorm3d, (1, 2, 2, 3, 2)),  # N=1 is fine: no batch statistics
    ],
)
def test_forward_backward_match_reference_and_buffers_never_change(cls, shape):
    f = cls(shape[1])
    f.load_state_dict(_trained(nn.BatchNorm2d(shape[1])).state_dict())
    snap = snapshot(f)
    assert list(f.parameters()) == []
    x = data(shape, seed=2).requires_grad_(True)
    dy = data(shape, seed=3)
    for mode in (True, False):  # train and eval mode alike
        f.train(mode)
        x.grad = None
        y = f(x)
        y.backward(dy)
        ref = R.batch_norm_eval(np64(x), np64(f.running_mean), np64(f.running_var), np64(f.weight), np64(f.bias))
        assert_rel_close(y, ref, F32, "y")
        scale, shift = f.scale_shift()
        assert_rel_close(y, np64(x) * np64(scale).reshape(R.param_shape(len(shape))) + np64(shift).reshape(
            R.param_shape(len(shape))), F32, "y = x * scale + shift")  # fmt: skip
        s_ref = np64(f.weight) / np.sqrt(np64(f.running_var) + 1e-5)
        assert_rel_close(x.grad, np64(dy) * s_ref.reshape(R.param_shape(len(shape))), F32, "dx = dy * scale")
        assert_unchanged(f, snap)


def test_large_offset_statistics_stay_accurate():
    f = FrozenBatchNorm2d(2)
    with torch.no_grad():
        f.running_mean.fill_(1e6)
    x = (data((2, 2, 3, 3), 0, dtype=torch.float64) + 1e6).float()
    ref = R.batch_norm_eval(np64(x), np64(f.running_mean), np64(f.running_var))
    assert_rel_close(f(x), ref, LARGE_OFFSET_TOL, "y at mean 1e6")


def test_state_dict_both_ways_and_without_counter():
    bn = _trained(nn.BatchNorm2d(4))
    f = FrozenBatchNorm2d(4)
    f.load_state_dict(bn.state_dict(), strict=True)
    back = nn.BatchNorm2d(4)
    back.load_state_dict(f.state_dict(), strict=True)
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    legacy = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}  # torchvision's layout
    f2 = FrozenBatchNorm2d(4)
    f2.load_state_dict(legacy, strict=True)
    assert torch.equal(f2.running_var, bn.running_var) and int(f2.num_batches_tracked) == 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), _trained(nn.BatchNorm2d(4)))
        self.b = _trained(BatchNorm2d(4, momentum=0.3))
        self.c = _trained(BatchRenorm2d(4, r_max=2.0, d_max=1.0))
        self.d = _trained(GhostBatchNorm2d(4, virtual_batch_size=2))
        self.e = nn.Sequential(nn.Flatten(), _trained(nn.BatchNorm1d(4 * 9, affine=False)), _trained(BatchNorm1d(36)))

    def forward(self, x):
        return self.e(self.d(self.c(self.b(self.a(x)))))


def test_freeze_unfreeze_round_trip_preserves_values_and_outputs():
    net = _Net().eval()
    before = snapshot(net)
    x = data((2, 3, 3, 3), 5)
    y0 = net(x).detach()
    classes = {n: type(m) for n, m in net.named_modules()}
    assert freeze(net) is net
    frozen = {n: type(m) for n, m in net.named_modules()}
    assert frozen["a.1"] is FrozenBatchNorm2d and frozen["c"] is FrozenBatchNorm2d and frozen["d"] is FrozenBatchNorm2d
    assert frozen["e.1"] is FrozenBatchNorm1d and frozen["e.2"] is FrozenBatchNorm1d
    assert_rel_close(net(x), y0, REL_TOL_VS_TORCH[torch.float32], "frozen output == eval output")
    assert all(not p.requires_grad or n.startswith("a.0") for n, p in net.named_parameters())
    assert [n for n, _ in net.named_parameters()] == ["a.0.weight", "a.0.bias"]

    assert unfreeze(net) is net
    assert {n: type(m) for n, m in net.named_modules()} == classes
    assert net.b.momentum == 0.3 and net.c.r_max == 2.0 and net.d.virtual_batch_size == 2
    assert net.e[1].affine is False
    after = snapshot(net)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(p.requires_grad for p in net.parameters())
    assert torch.equal(net(x), y0)


def test_root_module_and_explicit_class():
    bn = _trained(nn.BatchNorm3d(2))
    f = freeze(bn)
    assert type(f) is FrozenBatchNorm3d
    back = unfreeze(f, bn_class=BatchNorm2d)
    assert type(back) is BatchNorm2d and torch.equal(back.running_mean, bn.running_mean)
    built = unfreeze(nn.Sequential(FrozenBatchNorm1d(3)))  # never was trainable: this library's BatchNorm1d
    assert type(built[0]) is BatchNorm1d


def test_freeze_rejects_modules_without_statistics_and_changes_nothing():
    net = nn.Sequential(_trained(nn.BatchNorm2d(3)), nn.BatchNorm2d(3, track_running_stats=False))
    mods = list(net)
    snap = snapshot(net)
    with pytest.raises(ValueError, match=r"\['1'\] have track_running_stats=False"):
        freeze(net)
    assert list(net) == mods
    assert_unchanged(net, snap)


def test_wrong_input_rejected():
    f = FrozenBatchNorm2d(3)
    with pytest.raises(ValueError, match="expected 3"):
        f(data((2, 4, 2, 2), 0))
    with pytest.raises(ValueError, match="4D input"):
        f(data((2, 3, 2), 0))
