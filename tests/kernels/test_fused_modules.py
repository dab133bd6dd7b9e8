"""BatchNormAct1d/2d/3d on the Triton backend: against torch.nn (+ add + activation), state_dict
both ways, rejected calls, and a ``torch.compile(fullgraph=True)`` trace of the custom ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import REL_TOL, assert_rel_close

from batchnorm.nn.batchnorm import BatchNorm2d
from batchnorm.nn.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

pytest.importorskip("triton")

F32 = REL_TOL[torch.float32]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TORCH_ACT = {"relu": F.relu, "silu": F.silu, "identity": lambda t: t}


def _randomize(m: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g))
        m.running_mean.copy_(torch.randn(m.num_features, generator=g))
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.num_batches_tracked.fill_(5)


# (our class, torch.nn class, input shape, activation, momentum, why)
CASES = [
    (BatchNormAct2d, torch.nn.BatchNorm2d, (4, 3, 5, 7), "relu", 0.1, "the ResNet block ending"),
    (BatchNormAct2d, torch.nn.BatchNorm2d, (4, 3, 5, 7), "silu", None, "cumulative average (momentum=None)"),
    (BatchNormAct1d, torch.nn.BatchNorm1d, (9, 5), "relu", 0.3, "2-D input"),
    (BatchNormAct1d, torch.nn.BatchNorm1d, (3, 4, 6), "identity", 0.1, "3-D input, no activation"),
    (BatchNormAct3d, torch.nn.BatchNorm3d, (2, 3, 3, 4, 5), "silu", 0.1, "5-D input, N = 2"),
]


@pytest.mark.parametrize("ours_cls,torch_cls,shape,act,momentum", [c[:5] for c in CASES], ids=[c[5] for c in CASES])
def test_module_matches_torch_nn(ours_cls, torch_cls, shape, act, momentum):
    c = shape[1]
    ours = ours_cls(c, activation=act, momentum=momentum, backend="triton").to(DEV)
    ref = torch_cls(c, momentum=momentum).to(DEV)
    _randomize(ref, 0)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(shape, generator=g).to(DEV) * 2 + 1
        r = torch.randn(shape, generator=g).to(DEV)
        dy = torch.randn(shape, generator=g).to(DEV)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ra, rb = r.clone().requires_grad_(True), r.clone().requires_grad_(True)
        ya = ours(xa, ra)
        yb = TORCH_ACT[act](ref(xb) + rb)
        ya.backward(dy)
        yb.backward(dy)
        assert_rel_close(ya, yb, F32, f"y step {step}")
        assert_rel_close(xa.grad, xb.grad, F32, f"dx step {step}")
        assert_rel_close(ra.grad, rb.grad, F32, f"d residual step {step}")
        assert_rel_close(ours.weight.grad, ref.weight.grad, F32, "dgamma")
        assert_rel_close(ours.bias.grad, ref.bias.grad, F32, "dbeta")
        assert_rel_close(ours.running_mean, ref.running_mean, F32, "running_mean")
        assert_rel_close(ours.running_var, ref.running_var, F32, "running_var")
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 6 + step
    ours.eval()
    ref.eval()
    x = torch.randn(shape, generator=g).to(DEV)
    assert_rel_close(ours(x), TORCH_ACT[act](ref(x)), F32, "y (eval, no residual)")
    assert int(ours.num_batches_tracked) == 7  # eval does not count


def test_state_dict_both_ways():
    ref = torch.nn.BatchNorm2d(6)
    _randomize(ref, 2)
    ours = BatchNormAct2d(6, activation="silu")
    plain = BatchNorm2d(6)
    assert list(ours.state_dict()) == list(ref.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(ref.state_dict())  # torch.nn -> ours (strict)
    back = torch.nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())  # ours -> torch.nn
    plain.load_state_dict(ours.state_dict())  # ours -> batchnorm.BatchNorm2d
    ours2 = BatchNormAct2d(6)
    ours2.load_state_dict(plain.state_dict())  # batchnorm.BatchNorm2d -> ours
    for k, v in ref.state_dict().items():
        for m in (back, plain, ours2):
            assert torch.equal(m.state_dict()[k], v), k


def test_repr_and_identity_none():
    assert "(act): ReLU(inplace=True)" in repr(BatchNormAct2d(3))
    assert isinstance(BatchNormAct2d(3, apply_act=False).act, torch.nn.Identity)
    assert isinstance(BatchNormAct2d(3, act_layer=None).act, torch.nn.Identity)
    assert isinstance(BatchNormAct2d(3, activation="silu").act, torch.nn.SiLU)  # the earlier keyword


def test_rejected_calls_change_nothing():
    with pytest.raises(ValueError, match="unknown activation"):
        BatchNormAct2d(3, act_layer="no-such-activation")
    m = BatchNormAct2d(3, backend="triton").to(DEV)
    _randomize(m, 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="expected 4D"):
        m(torch.randn(2, 3, 4, device=DEV))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 4, 3, 3, device=DEV))
    with pytest.raises(ValueError, match="residual"):
        m(torch.randn(2, 3, 3, 3, device=DEV), residual=torch.randn(2, 3, 3, 1, device=DEV))
    with pytest.raises(TypeError, match="residual"):
        m(torch.randn(2, 3, 3, 3, device=DEV), residual=torch.randn(2, 3, 3, 3, device=DEV, dtype=torch.float64))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Block(torch.nn.Module):
    """conv -> BN+ReLU -> conv -> BN + shortcut + ReLU: the fused ops in a ResNet basic block."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(3, backend="triton")
        self.conv2 = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(3, backend="triton")

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)


def test_torch_compile_fullgraph():
    torch.manual_seed(4)
    eager = _Block().to(DEV)
    compiled_mod = _Block().to(DEV)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 5, device=DEV)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = eager(xa), compiled(xb)
        ya.sum().backward()
        yb.sum().backward()
        assert_rel_close(yb, ya, F32, "y compiled vs eager")
        assert_rel_close(xb.grad, xa.grad, F32, "dx compiled vs eager")
    for k, v in eager.state_dict().items():
        assert_rel_close(compiled_mod.state_dict()[k], v, F32, k)
    assert int(compiled_mod.bn2.num_batches_tracked) == 2
    eager.eval()
    compiled_mod.eval()
    assert_rel_close(compiled(x), eager(x), F32, "eval compiled vs eager")
