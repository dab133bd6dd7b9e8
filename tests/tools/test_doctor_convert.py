"""diagnose (each check fires on its pitfall and stays quiet on a healthy model) and convert."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from tolerances import REL_TOL, assert_rel_close

from batchnorm import reference as R
from batchnorm.nn.batchnorm import BatchNorm2d
from batchnorm.nn.fused import BatchNormAct2d
from batchnorm.tools.convert import convert
from batchnorm.tools.doctor import diagnose
from batchnorm.tools.recalibrate import recalibrate

from .models import ConvNet, randomize_bn

F32 = REL_TOL[torch.float32]


def _healthy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False),
                          BatchNorm2d(4))  # fmt: skip
    data = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    recalibrate(model, data, quiet=True)
    return model.eval(), data[0]


def test_healthy_model_has_no_findings():
    model, x = _healthy()
    report = diagnose(model, x)
    assert report.ok and report.findings == [], str(report)
    assert [li.name for li in report.layers] == ["1", "4"]
    assert all(li.gap is not None and li.gap < 0.1 for li in report.layers)


def _sick(check):
    model, x = _healthy()
    with torch.no_grad():
        if check == "bias_before_bn":
            model[0].bias = nn.Parameter(torch.zeros(8))
        elif check == "train_mode":
            model[1].train()
        elif check == "never_updated":
            model[4].reset_running_stats()
        elif check == "non_finite":
            model[1].running_var[2] = float("nan")
        elif check == "tiny_variance":
            model[4].running_var[1] = 1e-9
        elif check == "keras_momentum":
            model[1].momentum = 0.99
        elif check == "train_eval_gap":
            model[1].running_mean += 3.0
        elif check == "small_batch":
            x = x[:4]
        elif check == "no_running_stats":
            model[1] = nn.BatchNorm2d(8, track_running_stats=False)
    return model, x


# (check, layer it must name, severity)
SICK = [
    ("bias_before_bn", "1", "warning"),
    ("train_mode", "1", "warning"),
    ("never_updated", "4", "error"),
    ("non_finite", "1", "error"),
    ("tiny_variance", "4", "warning"),
    ("keras_momentum", "1", "warning"),
    ("train_eval_gap", "1", "warning"),
    ("small_batch", "<model>", "info"),
    ("no_running_stats", "1", "info"),
]


@pytest.mark.parametrize("check,layer,severity", SICK, ids=[s[0] for s in SICK])
def test_each_pitfall_is_found_and_model_untouched(check, layer, severity):
    model, x = _sick(check)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    report = diagnose(model, x)
    found = report.checks(check)
    assert [(f.layer, f.severity) for f in found] == [(layer, severity)], str(report)
    assert found[0].advice
    assert check in str(report) and layer in str(report)
    data = json.loads(report.to_json())
    assert any(f["check"] == check for f in data["findings"]) and len(data["layers"]) == 2
    for k, v in model.state_dict().items():  # bit-identical (NaN included)
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, equal_nan=True)
    assert [m.training for m in model.modules()] == modes


def test_small_batch_is_a_warning_when_training():
    model, x = _healthy()
    model.train()
    assert [f.severity for f in diagnose(model, x[:2]).checks("small_batch")] == ["warning"]


def test_gap_matches_reference():
    torch.manual_seed(3)
    bn = randomize_bn(nn.BatchNorm2d(5)).eval()
    x = torch.randn(6, 5, 4, 4) * 1.5 + 0.2
    report = diagnose(bn, x)
    p = [t.detach().double().numpy() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    y_train, _ = R.batch_norm_train(x.double().numpy(), p[2], p[3], bn.eps)
    y_eval = R.batch_norm_eval(x.double().numpy(), p[0], p[1], p[2], p[3], bn.eps)
    # the layer's gap is relative to the batch-normalized output (independent of the statistics judged);
    # the model gap relative to the model's eval output
    assert_rel_close(report.layers[0].gap, np.linalg.norm(y_train - y_eval) / np.linalg.norm(y_train), F32, "gap")
    assert_rel_close(report.model_gap, np.linalg.norm(y_train - y_eval) / np.linalg.norm(y_eval), F32, "model gap")


def test_diagnose_reports_a_failing_model_clearly():
    with pytest.raises(ValueError, match="failed on the example input"):
        diagnose(ConvNet(), torch.randn(2, 3, 5, 5))


# --- convert ----------------------------------------------------------------------------

# (to, kwargs, expected class name)
TARGETS = [
    ("batchnorm", {}, "BatchNorm2d"),
    ("act", {}, "BatchNormAct2d"),
    ("renorm", {"r_max": 2.0}, "BatchRenorm2d"),
    ("ghost", {"virtual_batch_size": 2}, "GhostBatchNorm2d"),
    ("frozen", {}, "FrozenBatchNorm2d"),
    ("sync", {}, "SyncBatchNorm"),
    ("torch_sync", {}, "SyncBatchNorm"),
    ("torch", {}, "BatchNorm2d"),
]


@pytest.mark.parametrize("to,kwargs,cls", TARGETS, ids=[t[0] for t in TARGETS])
def test_convert_keeps_values_and_eval_function(to, kwargs, cls):
    torch.manual_seed(0)
    src = randomize_bn(ConvNet(), 2)
    src.features[1].momentum = 0.2
    src.features[5].train(False)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    new = convert(src, to, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())  # input untouched
    assert type(src.features[1]) is nn.BatchNorm2d
    bn = new.features[1]
    assert type(bn).__name__ == cls
    assert type(new.classifier[2]).__name__ == cls.replace("2d", "1d")
    got = new.state_dict()
    for k, v in before.items():
        assert torch.equal(got[k], v), k
    if to != "frozen":
        assert bn.momentum == 0.2 and isinstance(bn.weight, nn.Parameter)
    assert bn.training and not new.features[5].training  # per-module mode kept
    x = torch.randn(3, 3, 16, 16)
    p = [t.detach().double().numpy() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    with torch.no_grad():
        z = src.features[0](x)
        out = bn.eval()(z)
    assert_rel_close(out, R.batch_norm_eval(z.double().numpy(), *p, bn.eps), F32, f"{to} eval")


def test_convert_round_trip_torch_ours_torch_is_bit_identical():
    src = randomize_bn(ConvNet(), 4)
    back = convert(convert(src, "batchnorm"), "torch")
    assert type(back.features[1]) is nn.BatchNorm2d
    sd0, sd1 = src.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_convert_to_groupnorm_keeps_affine_and_refuses_bad_groups():
    src = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)))
    gn = convert(src, "groupnorm", num_groups=2)
    assert type(gn[1]).__name__ == "GroupNorm" and gn[1].num_groups == 2
    assert torch.equal(gn[3].weight, src[3].weight) and torch.equal(gn[3].bias, src[3].bias)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    with pytest.raises(ValueError, match="does not divide the 6 channels of '1'"):
        convert(src, "groupnorm", num_groups=4)
    with pytest.raises(ValueError, match="needs num_groups"):
        convert(src, "groupnorm")
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize(
    "model,to,kwargs,match",
    [
        (nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)), "frozen", {}, "no statistics to freeze"),
        (nn.Sequential(BatchNormAct2d(4, activation="relu")), "torch", {}, r"applies act=ReLU\(.*\) after normalizing.*cannot hold"),
        (nn.Sequential(nn.BatchNorm2d(4)), "instance", {}, "unknown to="),
        (nn.Sequential(nn.SyncBatchNorm(4)), "torch", {}, "pass dim="),
        (nn.Sequential(nn.BatchNorm2d(4)), "ghost", {"virtual_batch_size": 0}, "cannot build GhostBatchNorm2d"),
        (nn.Sequential(nn.BatchNorm2d(4)), "torch", {"r_max": 2.0}, "does not take"),
    ],
    ids=["frozen without stats", "fused act to torch", "unknown target", "sync needs dim", "bad ghost", "bad kwarg"],
)
def test_convert_refuses_clearly(model, to, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert(model, to, **kwargs)


def test_convert_sync_with_dim():
    src = nn.Sequential(randomize_bn(nn.SyncBatchNorm(4)))
    out = convert(src, "batchnorm", dim=3)
    assert type(out[0]).__name__ == "BatchNorm3d" and torch.equal(out[0].running_var, src[0].running_var)
    assert copy.deepcopy(out)[0].num_batches_tracked == 10
