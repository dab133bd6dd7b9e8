"""Batch norms with extras (timm's BatchNormAct2d structure): one registry recognises them, and
convert / fold / freeze / doctor / recalibrate keep the activation or refuse - never drop it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from tolerances import REL_TOL, assert_rel_close

import batchnorm
from batchnorm import reference as R
from batchnorm.nn.frozen import FrozenBatchNormAct2d as OurFrozenAct2d
from batchnorm.nn.frozen import freeze, unfreeze
from batchnorm.nn.kinds import AfterNorm, attach_extras, batchnorm_modules, is_batchnorm, is_frozen, kind_of
from batchnorm.tools import convert, diagnose, fold_batchnorm, recalibrate

from . import timm_like as T
from .models import randomize_bn

F32 = REL_TOL[torch.float32]
OURS_HOLD_MODULES = isinstance(getattr(batchnorm.BatchNormAct2d(2), "act", None), nn.Module)


# (name, factory, is_batchnorm, frozen, has_extras, has_problem)
CASES = [
    ("torch BatchNorm2d", lambda: nn.BatchNorm2d(4), True, False, False, False),
    ("torch SyncBatchNorm", lambda: nn.SyncBatchNorm(4), True, False, False, False),
    ("ours BatchNorm2d", lambda: batchnorm.BatchNorm2d(4), True, False, False, False),
    ("ours SyncBatchNorm", lambda: batchnorm.SyncBatchNorm(4), True, False, False, False),
    ("ours BatchRenorm2d", lambda: batchnorm.BatchRenorm2d(4), True, False, False, False),
    ("ours GhostBatchNorm2d", lambda: batchnorm.GhostBatchNorm2d(4), True, False, False, False),
    ("ours BatchNormAct2d silu", lambda: batchnorm.BatchNormAct2d(4, activation="silu"), True, False, True, False),
    ("ours BatchNormAct2d identity", lambda: batchnorm.BatchNormAct2d(4, activation=None), True, False, False, False),
    ("ours FrozenBatchNorm2d", lambda: batchnorm.FrozenBatchNorm2d(4), True, True, False, False),
    ("timm BatchNormAct2d relu", lambda: T.BatchNormAct2d(4), True, False, True, False),
    ("timm BatchNormAct2d silu+dropout", lambda: T.BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout),
     True, False, True, False),
    ("timm BatchNormAct2d apply_act=False", lambda: T.BatchNormAct2d(4, apply_act=False), True, False, False, False),
    ("timm SyncBatchNormAct gelu", lambda: T.SyncBatchNormAct(4, act_layer=nn.GELU), True, False, True, False),
    ("timm FrozenBatchNormAct2d", lambda: T.FrozenBatchNormAct2d(4, act_layer=nn.SiLU), True, True, True, False),
    ("future ours BatchNormAct2d", lambda: T.FutureBatchNormAct2d(4, act_layer=nn.Hardswish), True, False, True, False),
    ("subclass overriding forward with plain BN", lambda: T.LoggingBN(4), True, False, False, False),
    ("subclass doing something else", lambda: T.Mystery(4), True, False, False, True),
    ("torch GroupNorm", lambda: nn.GroupNorm(2, 4), False, None, None, None),
    ("torch InstanceNorm2d with stats", lambda: nn.InstanceNorm2d(4, track_running_stats=True), False, None, None, None),
    ("ours GroupNorm", lambda: batchnorm.GroupNorm(2, 4), False, None, None, None),
    ("ours InstanceNorm2d with stats", lambda: batchnorm.InstanceNorm2d(4, track_running_stats=True), False, None, None,
     None),
    ("ours LayerNorm", lambda: batchnorm.LayerNorm(4), False, None, None, None),
]  # fmt: skip


@pytest.mark.parametrize("make,is_bn,frozen,extras,problem", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_registry_classifies(make, is_bn, frozen, extras, problem):
    m = randomize_bn(make())
    assert is_batchnorm(m) is is_bn
    if not is_bn:
        with pytest.raises(TypeError, match="not a batch norm"):
            kind_of(m)
        return
    kind = kind_of(m)
    assert (kind.frozen, is_frozen(m), kind.has_extras, kind.problem is not None) == (frozen, frozen, extras, problem)
    assert kind.plain is (not extras and not problem)
    if problem:
        assert "does something this library does not know" in kind.problem


def test_registry_sees_extras_not_the_batchnorms_children():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), T.BatchNormAct2d(4, act_layer=nn.PReLU))
    assert [n for n, _ in batchnorm_modules(model)] == ["1"]
    assert kind_of(model[1]).describe_extras() == "act=PReLU(num_parameters=1)"


def test_attach_extras_refuses_what_the_target_cannot_hold():
    bn = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match=r"BatchNorm2d has no place for act=SiLU\(\)"):
        attach_extras(bn, (("act", nn.SiLU()),))
    attach_extras(bn, (("drop", nn.Identity()), ("act", nn.Identity())))  # nothing to hold: fine
    ours = batchnorm.BatchNormAct2d(4, activation="relu")
    attach_extras(ours, (("act", nn.SiLU()),))
    assert kind_of(ours).describe_extras() == "act=SiLU()" and kind_of(ours).problem is None


# --- models with extras: the same eval function before and after each tool -------------------


class Block(nn.Module):
    """conv -> timm BNAct(SiLU, dropout) -> conv -> future-style BNAct(PReLU) with a residual -> ours BNAct(relu)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = T.BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.3))
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = T.FutureBatchNormAct2d(6, act_layer=nn.PReLU)
        self.conv3 = nn.Conv2d(6, 5, 1, bias=False)
        self.bn3 = batchnorm.BatchNormAct2d(5, activation="relu")

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.bn2(self.conv2(y), residual=y)
        return self.bn3(self.conv3(y))


def _block():
    torch.manual_seed(0)
    model = randomize_bn(Block(), 3)
    with torch.no_grad():
        model.bn2.act.weight.fill_(0.2)
    return model.eval()


def _eval64(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


def test_fold_keeps_the_activation_and_its_parameters():
    model, x = _block(), torch.randn(2, 3, 6, 6)
    expected = _eval64(model, x)
    folded, report = fold_batchnorm(model)
    kept = dict(report.kept)
    assert [b for b, _, _ in report.folded] == ["bn1", "bn3"] and list(kept) == ["bn2"]
    assert "extra arguments" in kept["bn2"]  # called with a residual: stays a batch norm, activation inside
    assert isinstance(folded.bn1, AfterNorm) and isinstance(folded.bn1.act, nn.SiLU)
    assert isinstance(folded.bn1.drop, nn.Dropout) and isinstance(folded.bn3, AfterNorm)
    with torch.no_grad():
        assert_rel_close(folded(x), expected, F32, "folded block")
    dropped = copy.deepcopy(folded)
    dropped.bn1 = nn.Identity()  # what the old fold did: the check above would catch it
    with torch.no_grad():
        assert float((dropped(x) - expected.float()).abs().max()) > 1e-2


def test_fold_keeps_prelu_state_dict_keys():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), T.BatchNormAct2d(4, act_layer=nn.PReLU)))
    folded, _ = fold_batchnorm(model)
    assert "1.act.weight" in folded.state_dict() and "1.running_mean" not in folded.state_dict()


def test_fold_leaves_an_unknown_forward_alone():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), T.Mystery(4), nn.Conv2d(4, 2, 1)))
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_batchnorm(model)
    assert report.num_folded == 0 and "does something this library does not know" in dict(report.kept)["1"]
    with torch.no_grad():
        assert_rel_close(folded(x), _eval64(model, x), F32, "unchanged")


def test_freeze_keeps_extras_and_unfreeze_restores_them():
    model, x = _block(), torch.randn(2, 3, 6, 6)
    keys = list(model.state_dict())
    expected = _eval64(model, x)
    frozen = freeze(copy.deepcopy(model))
    for name in ("bn1", "bn2", "bn3"):
        assert isinstance(getattr(frozen, name), OurFrozenAct2d), name
    assert isinstance(frozen.bn1.act, nn.SiLU) and isinstance(frozen.bn1.drop, nn.Dropout)
    assert list(frozen.state_dict()) == keys  # same keys as timm's layout: a checkpoint loads both ways
    with torch.no_grad():
        assert_rel_close(frozen(x), expected, F32, "frozen block")
    back = unfreeze(frozen)
    assert type(back.bn1) is T.BatchNormAct2d and isinstance(back.bn1.act, nn.SiLU)  # not the default ReLU
    assert type(back.bn2) is T.FutureBatchNormAct2d and isinstance(back.bn2.act, nn.PReLU)
    assert type(back.bn3) is batchnorm.BatchNormAct2d and type(back.bn3.act) is nn.ReLU
    with torch.no_grad():
        assert_rel_close(back.eval()(x), expected, F32, "unfrozen block")


def test_freeze_refuses_unknown_forward_and_changes_nothing():
    model = nn.Sequential(randomize_bn(nn.BatchNorm2d(3)), randomize_bn(T.Mystery(3)))
    before = list(model)
    with pytest.raises(ValueError, match=r"'1' \(Mystery\).*Nothing was changed"):
        freeze(model)
    assert list(model) == before


def test_unfreeze_into_a_class_without_room_refuses():
    frozen = freeze(nn.Sequential(randomize_bn(T.BatchNormAct2d(3, act_layer=nn.SiLU))))
    before = frozen[0]
    with pytest.raises(ValueError, match="cannot become BatchNorm2d"):
        unfreeze(frozen, nn.BatchNorm2d)
    assert frozen[0] is before


def test_convert_to_act_keeps_the_activation():
    src = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), T.BatchNormAct2d(4, act_layer=nn.SiLU))).eval()
    x = torch.randn(2, 3, 5, 5)
    out = convert(src, "act")
    assert type(out[1]) is batchnorm.BatchNormAct2d and type(out[1].act) is nn.SiLU
    with torch.no_grad():
        assert_rel_close(out.eval()(x), _eval64(src, x), F32, "converted to act")
    frozen = convert(src, "frozen")
    assert isinstance(frozen[1], OurFrozenAct2d)
    with torch.no_grad():
        assert_rel_close(frozen(x), _eval64(src, x), F32, "converted to frozen")


@pytest.mark.parametrize("to", ["torch", "batchnorm", "renorm", "sync", "torch_sync", "groupnorm"])
def test_convert_refuses_targets_without_room(to):
    src = nn.Sequential(randomize_bn(T.BatchNormAct2d(4, act_layer=nn.SiLU)))
    kwargs = {"num_groups": 2} if to == "groupnorm" else {}
    with pytest.raises(ValueError, match=r"'0' \(BatchNormAct2d\) applies act=SiLU\(inplace=True\).*Nothing was changed"):
        convert(src, to, **kwargs)


def test_convert_gelu_to_ours_follows_what_ours_can_hold():
    src = nn.Sequential(randomize_bn(T.BatchNormAct2d(4, act_layer=nn.GELU))).eval()
    if OURS_HOLD_MODULES:  # after the lead's change: any activation module
        out = convert(src, "act")
        x = torch.randn(2, 4, 3, 3)
        with torch.no_grad():
            assert_rel_close(out.eval()(x), _eval64(src, x), F32, "gelu kept")
    else:  # today: relu/silu/identity strings only
        with pytest.raises(ValueError, match="GELU is not one of this library's string activations"):
            convert(src, "act")


def test_convert_refuses_unknown_forward():
    with pytest.raises(ValueError, match=r"'0' \(Mystery\) cannot be converted"):
        convert(nn.Sequential(T.Mystery(4)), "batchnorm")


def test_doctor_and_recalibrate_see_through_the_extras():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), T.BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=nn.Dropout),
                          nn.Conv2d(6, 4, 1, bias=False), T.Mystery(4))  # fmt: skip
    batches = [torch.randn(16, 3, 6, 6) for _ in range(4)]
    recalibrate(model, batches, quiet=True)
    with torch.no_grad():  # the first BN's input is conv1's output: its exact moments
        z = np.concatenate([model[0](b).double().numpy() for b in batches])
    st = R.moments(z, (0, 2, 3))
    assert_rel_close(model[1].running_mean, st.mean, F32, "running_mean through BNAct")
    assert_rel_close(model[1].running_var, st.var_unbiased, F32, "running_var through BNAct")
    report = diagnose(model.eval(), torch.randn(16, 3, 6, 6))
    assert report.layers[0].extras == "drop=Dropout(p=0.5, inplace=False), act=SiLU(inplace=True)"
    assert [(f.layer, f.check, f.severity) for f in report.findings] == [("3", "unknown_forward", "info")], str(report)
