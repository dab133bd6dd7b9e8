"""The numbers the experiments compute are right on small cases (against the float64 reference where possible),
and the facts the reports rely on hold (pairing by seed, BN over two samples, ghost = BN, SyncBatchNorm = one process)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tolerances import REL_TOL, assert_rel_close, rel_err

import batchnorm
from batchnorm.experiments.data import Dataset
from batchnorm.experiments.models import MLP, ConvNet, norm_layer, scale_weights
from batchnorm.experiments.runs import probe_grad_norms, probe_saturation, probe_sigmoid_input, train_run
from batchnorm.experiments.train import batch_indices, eval_steps, evaluate, loss_and_accuracy, param_groups, train
from batchnorm.reference import core as ref


def _data(n_train=120, n_val=40, n_test=60, side=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val + n_test
    x = torch.rand(n, 1, side, side, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    a, b = n_train, n_train + n_val
    return Dataset("toy", x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


# k values: the experiment's four, plus a non-power-of-ten to catch special-casing
@pytest.mark.parametrize("k", [0.1, 10.0, 100.0, 3.7])
def test_bn_layer_is_scale_invariant_against_reference(k):
    """BN(k W u) in float32 equals the float64 reference BN(W u) (eps negligible) to float32 rounding."""
    torch.manual_seed(0)
    u = torch.randn(60, 64)
    w = torch.randn(100, 64) / 8
    bn = norm_layer("bn", 100, 1, eps=1e-12)
    y = bn(u @ (k * w).T)
    expected, _ = ref.batch_norm_train((u.double() @ w.double().T).numpy(), eps=1e-12)
    assert_rel_close(y, expected, REL_TOL[torch.float32], f"BN(kWu), k={k}")
    # the running statistics do scale: mean by k, variance by k^2 (reference's unbiased variance)
    st = ref.moments((u.double() @ w.double().T).numpy(), (0,))
    n = u.shape[0]
    assert_rel_close(bn.running_mean, 0.1 * k * st.mean, REL_TOL[torch.float32], "running_mean")
    assert_rel_close(bn.running_var, 0.9 + 0.1 * k * k * st.var * n / (n - 1), REL_TOL[torch.float32], "running_var")
    assert int(bn.num_batches_tracked) == 1


def test_init_scale_output_and_gradient_claims():
    from batchnorm.experiments.init_scale import output_change

    data = _data(side=8)
    bn = output_change(data, [32, 32], [0.1, 10.0, 100.0], "bn", seed=0, eps=1e-12)
    none = output_change(data, [32, 32], [0.1, 10.0, 100.0], "none", seed=0)
    assert max(o for o, _ in bn.values()) <= REL_TOL[torch.float32], bn
    assert max(g for _, g in bn.values()) <= REL_TOL[torch.float32], bn  # k * grad_k == grad_1: the 1/k law
    assert min(o for o, _ in none.values()) > 1e-2, none  # without BN the outputs really change
    assert min(g for _, g in none.values()) > 1e-2, none
    eps_default = output_change(data, [32, 32], [0.1], "bn", seed=0, eps=1e-5)
    assert eps_default[0.1][0] > 10 * bn[0.1][0], "eps=1e-5 should visibly break exact invariance at k=0.1"


def test_output_change_matches_direct_computation():
    from batchnorm.experiments.init_scale import output_change

    data = _data(side=8)
    got = output_change(data, [16], [10.0], "none", seed=5)[10.0][0]
    torch.manual_seed(5)
    net = MLP(64, [16], 10, norm="none", init="glorot")
    ref_out = net(data.test_x)
    scale_weights(net, 10.0)
    assert got == pytest.approx(rel_err(net(data.test_x), ref_out), rel=1e-12)
    torch.manual_seed(5)
    fresh = MLP(64, [16], 10, norm="none", init="glorot")
    assert torch.equal(fresh.head.weight, net.head.weight)
    assert torch.equal(10.0 * fresh.linears[0].weight, net.linears[0].weight)


def test_lr_times_k_squared_gives_the_same_trajectory():
    """The init-scale experiment's third arm: with BN and lr*k^2 on the scaled matrices, outputs follow k=1's."""
    data = _data(side=8)
    outs = []
    for k in (1.0, 10.0):
        torch.manual_seed(0)
        net = MLP(64, [32, 32], 10, norm="bn", eps=1e-12, init="glorot")
        scale_weights(net, k)
        opt = torch.optim.SGD(param_groups(net, 0.3, {lin.weight: 0.3 * k * k for lin in net.linears}), lr=0.3)
        train(net, data, steps=30, batch_size=20, lr=0.3, seed=0, evals=[30], optimizer=opt)
        # train mode: the running statistics start at (0, 1) whatever k is, so eval mode differs early on
        outs.append(net.train()(data.test_x))
    assert_rel_close(outs[1], outs[0], 1e-3, "trajectory with lr*k^2")  # 30 SGD steps amplify rounding


def test_arms_with_the_same_seed_start_from_the_same_weights():
    """Pairing by seed: the normalization layers draw no random numbers, so both arms share every weight."""
    for init in ("glorot", "kaiming", ("normal", 0.01), "torch"):
        torch.manual_seed(3)
        a = MLP(64, [16, 16], 10, norm="bn", init=init)
        torch.manual_seed(3)
        b = MLP(64, [16, 16], 10, norm="none", init=init)
        for la, lb in zip([*a.linears, a.head], [*b.linears, b.head]):
            assert torch.equal(la.weight, lb.weight) and torch.equal(la.bias, lb.bias)
    torch.manual_seed(3)
    c = ConvNet((1, 8, 8), 10, norm="group", init="kaiming")
    torch.manual_seed(3)
    d = ConvNet((1, 8, 8), 10, norm="none", init="kaiming")
    wc = [m.weight for m in c.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    wd = [m.weight for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(torch.equal(x, y) for x, y in zip(wc, wd))


def test_standard_inits_have_the_stated_scale():
    torch.manual_seed(0)
    net = MLP(400, [300], 10, init="glorot")
    w = net.linears[0].weight.detach()
    assert float(w.abs().max()) <= (6 / 700) ** 0.5 and float(w.std()) == pytest.approx((2 / 700) ** 0.5, rel=0.02)
    assert float(net.linears[0].bias.detach().abs().max()) == 0.0
    net = MLP(400, [300], 10, init="kaiming")
    assert float(net.linears[0].weight.detach().std()) == pytest.approx((2 / 400) ** 0.5, rel=0.02)
    net = MLP(400, [300], 10, init=("normal", 0.01))
    assert float(net.linears[0].weight.detach().std()) == pytest.approx(0.01, rel=0.02)
    with pytest.raises(ValueError, match="unknown init"):
        MLP(4, [3], 2, init="xavier")


@pytest.mark.parametrize("kind", ["bn", "renorm", "ghost", "group", "layer", "instance"])
def test_every_normalization_trains_in_the_convnet(kind):
    torch.manual_seed(0)
    net = ConvNet((1, 8, 8), 10, norm=kind, init="kaiming", renorm_steps=10, ghost_batch=4)
    names = {type(m).__name__ for m in net.modules()}
    expected = {"bn": "BatchNorm2d", "renorm": "BatchRenorm2d", "ghost": "GhostBatchNorm2d", "group": "GroupNorm",
                "layer": "LayerNorm", "instance": "InstanceNorm2d"}[kind]
    assert expected in names
    assert ("BatchNorm1d" in names) == (kind == "bn")
    if kind == "instance":  # a single feature has no per-sample statistics: the hidden Linears get none
        assert not any(isinstance(m, batchnorm.InstanceNorm1d) for m in net.modules())
    data = _data(side=8)
    h = train(net, data, steps=3, batch_size=8, lr=0.05, seed=0, evals=[3])
    assert not h["diverged"] and len(h["test_acc"]) == 2
    with pytest.raises(ValueError, match="instance norm needs feature maps"):
        norm_layer("instance", 8, 1)


def test_bn1d_over_two_samples_keeps_only_the_sign():
    """The small-batch finding: BatchNorm1d over N = 2 maps every feature to +-1 (before gamma/beta)."""
    x = torch.randn(2, 50) * torch.rand(50) * 10 + torch.randn(50)
    y = batchnorm.BatchNorm1d(50, eps=1e-12, affine=False)(x)
    assert_rel_close(y.abs(), torch.ones(2, 50), REL_TOL[torch.float32], "|BN(x)| over two samples")
    assert torch.equal(torch.sign(y[0]), torch.sign(x[0] - x[1]))
    # after a convolution the statistics pool N*H*W values: nothing like that happens
    z = batchnorm.BatchNorm2d(3, affine=False)(torch.randn(2, 3, 8, 8))
    assert float((z.abs() - 1).abs().mean()) > 0.3


def test_ghost_bn_with_the_batch_as_virtual_batch_is_bn():
    """The small-batch report says ghost BN with virtual batch >= the batch is plain BN."""
    x = torch.randn(4, 6, 5, 5)
    g, b = batchnorm.GhostBatchNorm2d(6, virtual_batch_size=4), batchnorm.BatchNorm2d(6)
    assert_rel_close(g(x), b(x), REL_TOL[torch.float32], "ghost(vb=N) vs BN")
    assert_rel_close(g.running_var, b.running_var, REL_TOL[torch.float32], "running_var")


def test_sync_batchnorm_over_processes_is_one_process_with_the_global_batch():
    """ddp_run with 2 processes x 2 images follows single-process BN at batch 4; local BN does not."""
    from batchnorm.experiments.runs import ddp_run

    data = _data(side=8)
    spec = {"model": {"kind": "conv", "norm": "bn", "fc": [16], "init": "kaiming"}, "lr": 0.05, "momentum": 0.9,
            "batch_size": 4, "steps": 4, "evals": [0, 1, 2, 3, 4]}
    single = train_run(spec, 0, data)
    sync = ddp_run({**spec, "world": 2, "batch_size": 2, "sync": True}, 0, data)
    local = ddp_run({**spec, "world": 2, "batch_size": 2, "sync": False}, 0, data)
    assert_rel_close(sync["train_loss"][1:], single["train_loss"][1:], REL_TOL[torch.float32], "SyncBN losses")
    assert rel_err(local["train_loss"][2:], single["train_loss"][2:]) > 1e-3
    assert sync["test_acc"] == single["test_acc"]


def test_grad_norm_probe_is_right_and_leaves_the_model_untouched():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16, 16, 16], 10, norm="bn")
    net.train()
    net(data.train_x[:30])  # non-trivial running statistics
    before = copy.deepcopy(net.state_dict())
    got = probe_grad_norms(net, data, {"batch_size": 20}, batches=2)["grad_norms"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    manual = np.zeros(3)
    for b in range(2):
        m = copy.deepcopy(net)
        m.load_state_dict(before)
        loss = torch.nn.functional.cross_entropy(m(data.train_x[b * 20:(b + 1) * 20]), data.train_y[b * 20:(b + 1) * 20])
        loss.backward()
        manual += [float(lin.weight.grad.norm()) for lin in m.linears]
    np.testing.assert_allclose(got, manual / 2, rtol=1e-6)


def test_sigmoid_input_probe_uses_batch_statistics_on_a_copy():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16, 12], 10, norm="bn", init="glorot")
    before = copy.deepcopy(net.state_dict())
    out = probe_sigmoid_input(net, data, {})
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    z = copy.deepcopy(net).train()(data.val_x, return_preacts=True)[1][-1].detach().double().numpy()
    assert out["p50"] == pytest.approx(float(np.percentile(z[:, 0], 50)), rel=1e-12)
    assert len(out["unit_median"]) == 12 and out["unit_band"][3] == pytest.approx(
        float(np.percentile(z[:, 3], 85) - np.percentile(z[:, 3], 15)), rel=1e-12)


def test_saturation_probe():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16], 10, norm="none", activation="sigmoid", init="glorot")
    assert probe_saturation(net, data, {"model": {"activation": "sigmoid"}})["saturated_frac"] < 0.1
    scale_weights(net, 1000.0)
    assert probe_saturation(net, data, {"model": {"activation": "sigmoid"}})["saturated_frac"] > 0.9
    relu = MLP(64, [16], 10, norm="none", activation="relu", init="kaiming")
    with torch.no_grad():
        relu.linears[0].bias.fill_(-100.0)
    out = probe_saturation(relu, data, {"model": {"activation": "relu"}})
    assert out["saturated_frac"] == 1.0 and out["dead_frac"] == 1.0


def test_learning_rate_states():
    from batchnorm.experiments.learning_rate import _state

    assert _state({"diverged": True, "test_acc": [0.1]}, 0.8, 0.5) == "diverged"
    assert _state({"diverged": False, "test_acc": [0.1, 0.9], "saturated_frac": 0.9}, 0.8, 0.5) == "trained"
    assert _state({"diverged": False, "test_acc": [0.1, 0.2], "saturated_frac": 0.9}, 0.8, 0.5) == "saturated"
    assert _state({"diverged": False, "test_acc": [0.1, 0.2], "saturated_frac": 0.1}, 0.8, 0.5) == "failed"


def test_bias_before_bn_is_redundant_in_float32():
    from batchnorm.experiments.bias import layer_check

    for seed in (0, 1):
        for name, v in layer_check(seed).items():
            assert v["with_vs_without"] <= REL_TOL[torch.float32], (name, v)
            assert v["with_vs_reference"] <= REL_TOL[torch.float32], (name, v)


def test_fig1_drift_measure():
    from batchnorm.experiments.fig1 import drift

    h = {"unit_median": [[0.0, 1.0], [2.0, 1.0], [1.0, 4.0]], "unit_band": [[1.0, 1.0], [1.0, 3.0], [2.0, 1.0]]}
    assert drift(h) == (2.5, 1.5)  # unit medians range over 2 and 3, band widths over 1 and 2


def test_evaluate_train_mode_keeps_running_stats():
    data = _data(side=8)
    torch.manual_seed(0)
    net = ConvNet((1, 8, 8), 10, norm="bn")
    before = copy.deepcopy(net.state_dict())
    loss_b, acc_batch = loss_and_accuracy(net, data.test_x, data.test_y, train_mode=True, batch_size=20)
    acc_eval = evaluate(net, data.test_x, data.test_y)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    m = copy.deepcopy(net).train()
    outs = [m(data.test_x[i:i + 20]).detach() for i in (0, 20, 40)]
    assert acc_batch == sum(int((o.argmax(1) == data.test_y[i:i + 20]).sum()) for o, i in zip(outs, (0, 20, 40))) / 60
    expected = sum(float(torch.nn.functional.cross_entropy(o, data.test_y[i:i + 20], reduction="sum"))
                   for o, i in zip(outs, (0, 20, 40))) / 60
    assert loss_b == pytest.approx(expected, rel=1e-6)
    net.eval()
    assert acc_eval == int((net(data.test_x).argmax(1) == data.test_y).sum()) / 60


def test_batch_indices_are_seeded_permutations():
    it = batch_indices(10, 3, seed=4)
    epoch = torch.cat([next(it) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # 3 full batches, the 10th sample dropped this epoch
    again = batch_indices(10, 3, seed=4)
    assert all(torch.equal(next(again), b) for b in (epoch[:3], epoch[3:6], epoch[6:9]))
    with pytest.raises(ValueError, match="batch_size must be in 1..10"):
        next(batch_indices(10, 11, 0))


def test_eval_steps():
    assert eval_steps(100, 50, dense_until=20, dense_every=10) == [0, 10, 20, 50, 100]
    assert eval_steps(7, 5) == [0, 5, 7]


def test_train_records_history_and_bn_buffers():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16], 10, norm="bn", momentum=0.1)
    h = train(net, data, steps=25, batch_size=20, lr=0.1, seed=0, evals=[10, 20])
    assert h["step"] == [0, 10, 20, 25] and len(h["test_acc"]) == len(h["val_acc"]) == 4 and not h["diverged"]
    assert int(net.norms[0].num_batches_tracked) == 25
    assert h["val_acc"][-1] == evaluate(net, data.val_x, data.val_y)
    assert not net.training


def test_diverging_run_stops_and_is_flagged():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16], 10, norm="none", activation="relu")
    h = train(net, data, steps=50, batch_size=20, lr=1e30, seed=0, evals=[10, 20, 30, 40])
    assert h["diverged"] and h["step"][-1] < 50 and h["diverged_at"] <= 50
