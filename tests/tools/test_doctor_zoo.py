"""The doctor on a zoo of correctly built, calibrated networks: quiet at batch 8 and 32 (thresholds from
the sampling noise of the values per channel), frozen BNs handled, and the real pitfalls still found."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from batchnorm.nn.frozen import freeze
from batchnorm.nn.kinds import batchnorm_modules
from batchnorm.tools import diagnose, recalibrate
from batchnorm.tools._graph import analyse
from batchnorm.tools.doctor import expected_gap

from .zoo import ZOO, images


@pytest.fixture(scope="module")
def calibrated():
    """Each zoo model with exact statistics over 8 batches of 32 images."""
    out = {}
    for i, (name, cls) in enumerate(ZOO.items()):
        torch.manual_seed(i)
        model = cls().eval()
        recalibrate(model, [images(32, 100 * i + k) for k in range(8)], quiet=True)
        out[name] = model
    return out


@pytest.fixture(scope="module")
def reports(calibrated):
    return {(name, n): diagnose(model, images(n, 7 + n)) for name, model in calibrated.items() for n in (8, 32)}


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize("name", list(ZOO))
def test_calibrated_zoo_has_no_warning_or_error(reports, name, batch):
    report = reports[(name, batch)]
    assert [f for f in report.findings if f.severity != "info"] == [], str(report)
    assert report.layers and all(li.gap is not None and li.gap_limit is not None for li in report.layers)
    assert all(li.gap <= li.gap_limit for li in report.layers)


def test_the_zoo_has_gaps_a_fixed_threshold_would_flag(reports):
    """The noise is real: at batch 8 some layers of correct models exceed 0.1 (the old fixed threshold);
    the limits derived from the values per channel are wider there, and narrow at batch 32."""
    small = [li for (name, n), r in reports.items() if n == 8 for li in r.layers]
    assert sum(li.gap > 0.1 for li in small) >= 3
    assert max(li.gap_limit for li in small) > 0.25
    big = [li for (name, n), r in reports.items() if n == 32 for li in r.layers]
    assert min(li.gap_limit for li in big) == pytest.approx(0.1)  # the floor: noise is small there


def test_frozen_batchnorms_are_handled(calibrated):
    """Frozen (loaded without a counter, conv biases before them, even in train mode at batch 4): no findings."""
    model = freeze(copy.deepcopy(calibrated["resnet"]))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = freeze(ZOO["resnet"]())
    fresh.load_state_dict(sd, strict=False)  # counters absent: they load as 0, statistics are real
    for site in analyse(fresh).sites.values():
        if site.prev is not None:
            conv = fresh.get_submodule(site.prev)
            conv.bias = nn.Parameter(torch.full((conv.out_channels,), 0.1))
    for mode in (False, True):
        report = diagnose(fresh.train(mode), images(4, 3))
        assert [f for f in report.findings if f.severity != "info"] == [], str(report)
        assert all(li.frozen and li.gap is None for li in report.layers)


def _first_conv_site(model):
    return next(s for s in analyse(model).sites.values() if s.prev is not None and s.prev_exclusive)


PITFALLS = ["bias_before_bn", "keras_momentum", "batch_1_training", "never_updated", "wrong_preprocessing"]


@pytest.mark.parametrize("pitfall", PITFALLS)
@pytest.mark.parametrize("name", list(ZOO))
def test_pitfalls_are_still_found_in_the_zoo(calibrated, name, pitfall):
    model = copy.deepcopy(calibrated[name])
    bns = batchnorm_modules(model)
    x = images(32, 5)
    if pitfall == "bias_before_bn":
        site = _first_conv_site(model)
        conv = model.get_submodule(site.prev)
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        want = [(site.name, "bias_before_bn", "warning")]
    elif pitfall == "keras_momentum":
        bns[1][1].momentum = 0.99
        want = [(bns[1][0], "keras_momentum", "warning")]
    elif pitfall == "batch_1_training":
        model.train()
        x = images(1, 5)
        want = [("<model>", "small_batch", "warning")]
    elif pitfall == "never_updated":
        bns[-1][1].reset_running_stats()
        want = [(bns[-1][0], "never_updated", "error")]
    else:  # statistics from other preprocessing (images scaled by 3, shifted by 2)
        x = x * 3 + 2
        want = [(bns[0][0], "train_eval_gap", "warning")]
    report = diagnose(model, x)
    got = [(f.layer, f.check, f.severity) for f in report.findings if f.check == want[0][1]]
    assert got[: len(want)] == want, str(report)
    if pitfall != "batch_1_training":
        others = {f.check for f in report.findings if f.severity != "info"} - {want[0][1]}
        assert pitfall == "never_updated" and others <= {"train_eval_gap"} or not others, str(report)


# --- the noise model itself ------------------------------------------------------------------


def _gap(x, mean, var):
    """||BN_batch(x) - BN_pop(x)|| / ||BN_batch(x)|| in float64, population statistics given."""
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y_b = (x - x.mean(dims).view(shape)) / (x.var(dims, correction=0) + 1e-5).sqrt().view(shape)
    y_p = (x - mean.view(shape)) / (var + 1e-5).sqrt().view(shape)
    return float((y_b - y_p).norm() / y_b.norm())


def test_expected_gap_is_the_sampling_noise_for_iid_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 8, 8, generator=g)
    assert expected_gap(x, None, 1e-5) == pytest.approx(math.sqrt(1.5 / (32 * 64)), rel=0.1)
    gaps = torch.tensor([_gap(torch.randn(32, 16, 8, 8, generator=g), torch.zeros(16), torch.ones(16))
                         for _ in range(100)])  # fmt: skip
    assert float(gaps.square().mean().sqrt()) == pytest.approx(math.sqrt(1.5 / (32 * 64)), rel=0.05)


def test_expected_gap_accounts_for_correlated_values():
    """Each sample shifts a whole channel (like an image's brightness): far fewer independent values
    than N * H * W. The estimate follows the true RMS gap, which sqrt(1.5 / m) underestimates 10x."""
    g = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(16, 8, 8, 8, generator=g) + torch.randn(16, 8, 1, 1, generator=g)

    pop_var = torch.full((8,), 2.0)  # 1 (pixel noise) + 1 (per-sample offset)
    gaps = torch.tensor([_gap(batch(), torch.zeros(8), pop_var) for _ in range(200)])
    estimates = torch.tensor([expected_gap(batch(), None, 1e-5) for _ in range(200)])
    rms = float(gaps.square().mean().sqrt())
    assert float(estimates.square().mean().sqrt()) == pytest.approx(rms, rel=0.1)
    assert rms > 5 * math.sqrt(1.5 / (16 * 64))


def test_expected_gap_needs_two_samples():
    assert expected_gap(torch.randn(1, 4, 8, 8), None, 1e-5) is None
