"""The numbers the experiments compute are right on small cases (against the float64 reference where possible)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tolerances import REL_TOL, assert_rel_close, rel_err

from batchnorm.experiments.data import Dataset
from batchnorm.experiments.depth import grad_norms
from batchnorm.experiments.init_scale import output_change
from batchnorm.experiments.models import MLP, ConvNet, norm_layer, scale_weights
from batchnorm.experiments.train import batch_indices, evaluate, steps_to_reach, train
from batchnorm.reference import core as ref


def _data(n_train=120, n_test=60, side=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_test, 1, side, side, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Dataset("toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


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
    assert_rel_close(bn.running_var, 0.9 + 0.1 * k * k * st.var * n / (n - 1), REL_TOL[torch.float32],
                     "running_var")
    assert int(bn.num_batches_tracked) == 1


def test_init_scale_output_change_claim():
    data = _data(side=8)
    bn = output_change(data, [32, 32], [0.1, 10.0, 100.0], "bn", seed=0, eps=1e-12)
    none = output_change(data, [32, 32], [0.1, 10.0, 100.0], "none", seed=0)
    assert max(bn.values()) <= REL_TOL[torch.float32], bn
    assert min(none.values()) > 1e-2, none  # without BN the outputs really change
    eps_default = output_change(data, [32, 32], [0.1], "bn", seed=0, eps=1e-5)
    assert eps_default[0.1] > 10 * bn[0.1], "eps=1e-5 should visibly break exact invariance at k=0.1"


def test_output_change_matches_direct_computation():
    data = _data(side=8)
    got = output_change(data, [16], [10.0], "none", seed=5)[10.0]
    torch.manual_seed(5)
    net = MLP(64, [16], 10, norm="none")
    ref_out = net(data.test_x)
    scale_weights(net, 10.0)
    assert got == pytest.approx(rel_err(net(data.test_x), ref_out), rel=1e-12)
    torch.manual_seed(5)
    fresh = MLP(64, [16], 10, norm="none")
    assert torch.equal(fresh.head.weight, net.head.weight)
    assert torch.equal(10.0 * fresh.linears[0].weight, net.linears[0].weight)


def test_lr_times_k_squared_gives_the_same_trajectory():
    """The init-scale experiment's third arm: with BN and lr*k^2 on the scaled matrices, outputs follow k=1's."""
    data = _data(side=8)
    from batchnorm.experiments.train import param_groups

    outs = []
    for k in (1.0, 10.0):
        torch.manual_seed(0)
        net = MLP(64, [32, 32], 10, norm="bn", eps=1e-12)
        scale_weights(net, k)
        opt = torch.optim.SGD(param_groups(net, 0.3, {lin.weight: 0.3 * k * k for lin in net.linears}), lr=0.3)
        train(net, data, steps=30, batch_size=20, lr=0.3, seed=0, eval_every=30, quiet=True, optimizer=opt)
        # train mode: the running statistics start at (0, 1) whatever k is, so eval mode differs early on
        outs.append(net.train()(data.test_x))
    assert_rel_close(outs[1], outs[0], 1e-3, "trajectory with lr*k^2")  # 30 SGD steps amplify rounding


def test_grad_norms_are_right_and_leave_the_model_untouched():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16, 16, 16], 10, norm="bn")
    net.train()
    net(data.train_x[:30])  # non-trivial running statistics
    before = copy.deepcopy(net.state_dict())
    got = grad_norms(net, data.train_x, data.train_y, 20, 2)
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


def test_evaluate_train_mode_keeps_running_stats():
    data = _data(side=8)
    torch.manual_seed(0)
    net = ConvNet((1, 8, 8), 10, norm="bn")
    before = copy.deepcopy(net.state_dict())
    acc_batch = evaluate(net, data.test_x, data.test_y, train_mode=True, batch_size=20)
    acc_eval = evaluate(net, data.test_x, data.test_y)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # check against a direct count
    m = copy.deepcopy(net).train()
    direct = sum(int((m(data.test_x[i:i + 20]).argmax(1) == data.test_y[i:i + 20]).sum()) for i in (0, 20, 40)) / 60
    assert acc_batch == direct
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


def test_steps_to_reach():
    assert steps_to_reach([0, 10, 20, 30], [0.1, 0.5, 0.9, 0.95], 0.9) == 20
    assert steps_to_reach([0, 10], [0.1, 0.5], 0.9) is None


def test_train_records_history_and_bn_buffers():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16], 10, norm="bn", momentum=0.1)
    h = train(net, data, steps=25, batch_size=20, lr=0.1, seed=0, eval_every=10, quiet=True)
    assert h["step"] == [0, 10, 20, 25] and len(h["test_acc"]) == 4 and not h["diverged"]
    assert int(net.norms[0].num_batches_tracked) == 25
    assert not net.training


def test_diverging_run_stops_and_is_flagged():
    data = _data(side=8)
    torch.manual_seed(0)
    net = MLP(64, [16], 10, norm="none", activation="relu")
    h = train(net, data, steps=50, batch_size=20, lr=1e30, seed=0, eval_every=10, quiet=True)
    assert h["diverged"] and h["step"][-1] < 50


def test_fig1_headline_speedup_from_metrics():
    from batchnorm.experiments import fig1

    steps = [0, 100, 200, 300]
    curves = {arm: {"step": steps, "test_acc": acc, "train_loss": [0.0] * 4,
                    "p15": [0.0] * 4, "p50": [0.0] * 4, "p85": [0.0] * 4}
              for arm, acc in (("bn", [0.1, 0.95, 0.97, 0.98]), ("none", [0.1, 0.2, 0.5, 0.92]))}
    metrics = {"settings": {"threshold": 0.9, "steps": 300, "lr": 0.5, "init_std": 0.01, "batch_size": 60,
                            "eval_every": 100},
               "curves": curves, "fingerprint": {"data_name": "digits"},
               "data_description": "digits: 10 training / 4 test images of 8x8"}
    rows = fig1.section(metrics).headline[1]
    assert rows[0] == ["steps to reach 90% test accuracy", "100", "300", "3.0x"]
    curves["none"]["test_acc"] = [0.1] * 4
    assert fig1.section(metrics).headline[1][0][2:] == ["not in 300", "> 3.0x (without BN never reached it)"]
