"""The tools people already use see, trace, export and compile models built from this library.

``isinstance`` checks (swa_utils.update_bn, convert_sync_batchnorm), ``torch.fx.symbolic_trace``,
``torch.export``, both ONNX exporters (run in onnxruntime against eager), ``torch.compile(fullgraph=True)``,
``bias=`` everywhere, and timm-style ``BatchNormAct2d`` checkpoints."""

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.errors import InputError
from family._util import data
from tolerances import REL_TOL, REL_TOL_VS_TORCH, assert_rel_close

F32 = REL_TOL[torch.float32]
VS_TORCH = REL_TOL_VS_TORCH[torch.float32]

#: (ours, the torch.nn class it must be an instance of)
INSTANCES = [
    (lambda: batchnorm.BatchNorm1d(4), nn.BatchNorm1d),
    (lambda: batchnorm.BatchNorm2d(4), nn.BatchNorm2d),
    (lambda: batchnorm.BatchNorm3d(4), nn.BatchNorm3d),
    (lambda: batchnorm.SyncBatchNorm(4), nn.SyncBatchNorm),
    (lambda: batchnorm.GroupNorm(2, 4), nn.GroupNorm),
    (lambda: batchnorm.LayerNorm(4), nn.LayerNorm),
    (lambda: batchnorm.InstanceNorm1d(4), nn.InstanceNorm1d),
    (lambda: batchnorm.InstanceNorm2d(4), nn.InstanceNorm2d),
    (lambda: batchnorm.InstanceNorm3d(4), nn.InstanceNorm3d),
    (lambda: batchnorm.GhostBatchNorm2d(4), nn.BatchNorm2d),
    (lambda: batchnorm.BatchRenorm2d(4), nn.BatchNorm2d),
    (lambda: batchnorm.BatchNormAct2d(4), nn.BatchNorm2d),
]


@pytest.mark.parametrize("make,cls", INSTANCES, ids=lambda v: getattr(v, "__name__", ""))
def test_instances_of_the_torch_nn_classes(make, cls):
    m = make()
    assert isinstance(m, cls)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        assert isinstance(m, nn.modules.batchnorm._NormBase)


@pytest.mark.parametrize("make,cls", INSTANCES, ids=lambda v: getattr(v, "__name__", ""))
def test_bias_false_everywhere(make, cls):
    m = make()
    kw = {k: getattr(m, k) for k in ("virtual_batch_size",) if hasattr(m, k)}
    args = (m.num_groups, m.num_channels) if isinstance(m, nn.GroupNorm) else (
        (m.normalized_shape,) if isinstance(m, nn.LayerNorm) else (m.num_features,))
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        kw["affine"] = True
    no_bias = type(m)(*args, bias=False, **kw)
    theirs = cls(*args, bias=False, **({"affine": True} if "affine" in kw else {}))
    assert no_bias.bias is None and no_bias.weight is not None
    assert list(no_bias.state_dict()) == list(theirs.state_dict())


def _net(lib):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), lib.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8),
                         lib.BatchNorm1d(8))  # fmt: skip


def test_swa_update_bn_recomputes_our_statistics_like_torch_nn():
    ours, theirs = _net(batchnorm), _net(nn)
    theirs.load_state_dict(ours.state_dict())
    loader = [data((8, 3, 4, 4), s) for s in range(4)]
    for net in (ours, theirs):
        torch.optim.swa_utils.update_bn(loader, net)
    for k, v in theirs.state_dict().items():
        assert_rel_close(ours.state_dict()[k], v, VS_TORCH, k) if v.is_floating_point() else None
    assert int(ours[1].num_batches_tracked) == int(theirs[1].num_batches_tracked) == 4
    assert ours[1].momentum == 0.1  # restored afterwards, as for torch.nn


def test_torch_convert_sync_batchnorm_sees_our_layers():
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(_net(batchnorm))
    assert isinstance(converted[1], nn.SyncBatchNorm)


class _AllModules(nn.Module):
    """Every module of the library in one model (eval-mode functions composed)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = batchnorm.BatchNorm2d(8)
        self.act = batchnorm.BatchNormAct2d(8)
        self.gn = batchnorm.GroupNorm(2, 8)
        self.inorm = batchnorm.InstanceNorm2d(8, affine=True)
        self.ln = batchnorm.LayerNorm([8, 5, 5])
        self.ghost = batchnorm.GhostBatchNorm2d(8, virtual_batch_size=2)
        self.renorm = batchnorm.BatchRenorm2d(8, r_max=1.5, d_max=0.5)
        self.frozen = batchnorm.FrozenBatchNorm2d(8)
        self.sync = batchnorm.SyncBatchNorm(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(200, 6), batchnorm.BatchNorm1d(6))

    def forward(self, x):
        x = self.conv(x)
        for m in (self.bn, self.act, self.gn, self.inorm, self.ln, self.ghost, self.renorm, self.frozen, self.sync):
            x = m(x)
        return self.head(x)


def _trained_model():
    torch.manual_seed(0)
    m = _AllModules()
    for s in range(3):
        m(data((4, 3, 5, 5), s))
    return m.eval()


def test_fx_symbolic_trace_keeps_our_modules_as_leaves():
    m = _trained_model()
    gm = torch.fx.symbolic_trace(m)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"bn", "act", "gn", "inorm", "ln", "ghost", "renorm", "frozen", "sync", "head.2"} <= called
    x = data((4, 3, 5, 5), 9)
    assert torch.equal(gm(x), m(x))
    # training through the traced graph updates the same buffers as the eager model
    eager, traced = _trained_model().train(), torch.fx.symbolic_trace(_trained_model()).train()
    for s in range(2):
        assert_rel_close(traced(data((4, 3, 5, 5), 20 + s)), eager(data((4, 3, 5, 5), 20 + s)), 0.0, "train")
    for k, v in eager.state_dict().items():
        assert torch.equal(traced.state_dict()[k], v), k


def test_torch_export_eval_and_train():
    x = data((4, 3, 5, 5), 9)
    m = _trained_model()
    ep = torch.export.export(m, (x,))
    assert_rel_close(ep.module()(x), m(x), VS_TORCH, "exported (eval)")
    m2 = _trained_model().train()
    ep2 = torch.export.export(_trained_model().train(), (x,))
    assert_rel_close(ep2.module()(x), m2(x), VS_TORCH, "exported (train)")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnxruntime(dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="pip install batchnorm[dev] installs onnxruntime")
    pytest.importorskip("onnxscript" if dynamo else "onnx", reason="pip install batchnorm[dev]")
    m = _trained_model()
    x = data((4, 3, 5, 5), 9)
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), path, dynamo=dynamo)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert_rel_close(out, m(x).detach().numpy(), 1e-5, "onnxruntime vs eager")


def test_torch_compile_fullgraph_every_module():
    x = data((4, 3, 5, 5), 9)
    eager, compiled_mod = _trained_model().train(), _trained_model().train()
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    for s in range(2):
        xs = data((4, 3, 5, 5), 30 + s)
        assert_rel_close(compiled(xs), eager(xs), 1e-5, f"compiled train step {s}")
    for k, v in eager.state_dict().items():
        if v.is_floating_point():  # (layers after a norm see unit-scale data: their running means sit near 0)
            assert_rel_close(compiled_mod.state_dict()[k], v, 1e-5, k, scale=1.0)
        else:
            assert torch.equal(compiled_mod.state_dict()[k], v), k
    eager.eval(), compiled_mod.eval()
    assert_rel_close(compiled(x), eager(x), 1e-5, "compiled eval")


# --- timm-style BatchNormAct2d ---------------------------------------------------------------------


class TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """A module built like timm's ``BatchNormAct2d`` (timm cannot be installed beside the CPU build of torch
    here): a BatchNorm2d subclass with dropout in ``.drop`` and the activation in ``.act``, applied in that
    order after the normalization; ``apply_act=False`` makes ``.act`` an identity."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None):  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        kwargs = dict(act_kwargs or {})
        if act_layer in (nn.ReLU, nn.SiLU, nn.LeakyReLU):
            kwargs["inplace"] = inplace
        self.act = act_layer(**kwargs) if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


TIMM_CONFIGS = {
    "relu": dict(),
    "silu": dict(act_layer=nn.SiLU),
    "gelu": dict(act_layer=nn.GELU),
    "leaky_relu with act_kwargs": dict(act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
    "no activation": dict(apply_act=False),
    "dropout (eval)": dict(drop_layer=lambda: nn.Dropout(0.5)),
    "eps and momentum positional": dict(),
}


@pytest.mark.parametrize("name", sorted(TIMM_CONFIGS))
def test_timm_checkpoint_loads_with_equal_outputs(name):
    kw = TIMM_CONFIGS[name]
    args = (6, 1e-3, 0.3) if "positional" in name else (6,)
    timm_like = TimmStyleBatchNormAct2d(*args, **kw)
    with torch.no_grad():
        timm_like.weight.uniform_(0.5, 1.5), timm_like.bias.uniform_(-1, 1)
    for s in range(2):
        timm_like(data((4, 6, 3, 3), s))  # some running statistics
    ours = batchnorm.BatchNormAct2d(*args, **kw)
    ours.load_state_dict(timm_like.state_dict())  # strict: the same keys
    assert type(ours.act) is type(timm_like.act) and type(ours.drop) is type(timm_like.drop)
    assert ours.eps == timm_like.eps and ours.momentum == timm_like.momentum
    x = data((4, 6, 3, 3), 7, offset=0.5)
    timm_like.eval(), ours.eval()
    assert_rel_close(ours(x), timm_like(x), VS_TORCH, f"{name}: eval")
    if "dropout" not in name:  # (training-mode dropout is random)
        timm_like.train(), ours.train()
        assert_rel_close(ours(x), timm_like(x), VS_TORCH, f"{name}: train")
        for k, v in timm_like.state_dict().items():
            assert_rel_close(ours.state_dict()[k], v, VS_TORCH, k) if v.is_floating_point() else None


def test_fused_path_only_for_activations_the_kernels_know():
    assert batchnorm.BatchNormAct2d(4)._fused_name() == "relu"
    assert batchnorm.BatchNormAct2d(4, act_layer="silu")._fused_name() == "silu"
    assert batchnorm.BatchNormAct2d(4, apply_act=False)._fused_name() is None
    assert batchnorm.BatchNormAct2d(4, act_layer=nn.GELU)._fused_name() is False
    assert batchnorm.BatchNormAct2d(4, drop_layer=nn.Dropout)._fused_name() is False
    m = batchnorm.BatchNormAct2d(4, act_layer=nn.GELU)
    x, r = data((2, 4, 3, 3), 1), data((2, 4, 3, 3), 2)
    ref = nn.functional.gelu(nn.functional.batch_norm(x, None, None, training=True) + r)
    assert_rel_close(m(x, residual=r), ref, F32, "gelu(bn(x) + residual)")
    assert np.isfinite(m(x).detach().numpy()).all()


# --- the argument types torch.nn accepts ---------------------------------------------------------
#: (ours built with NumPy scalars, the same torch.nn module built with Python numbers)
NUMPY_ARGS = [
    (lambda: batchnorm.BatchNorm2d(np.int64(4), eps=np.float32(1e-3), momentum=np.float64(0.3)),
     lambda: nn.BatchNorm2d(4, eps=float(np.float32(1e-3)), momentum=0.3)),
    (lambda: batchnorm.SyncBatchNorm(np.int32(4), momentum=np.float32(0.5)), lambda: nn.SyncBatchNorm(4, momentum=0.5)),
    (lambda: batchnorm.GroupNorm(np.int64(2), np.int64(4)), lambda: nn.GroupNorm(2, 4)),
    (lambda: batchnorm.LayerNorm(np.int64(5)), lambda: nn.LayerNorm(5)),
    (lambda: batchnorm.InstanceNorm2d(np.int64(4), affine=True, track_running_stats=True),
     lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
    (lambda: batchnorm.FrozenBatchNorm2d(np.int64(4), eps=np.float32(1e-3)), None),
]


@pytest.mark.parametrize("make,make_torch", NUMPY_ARGS, ids=lambda v: "")
def test_numpy_scalar_arguments_are_numbers(make, make_torch):
    """NumPy integers and floats (e.g. read from a config array) are accepted and stored as Python numbers."""
    ours = make()
    for name in ("num_features", "num_channels", "num_groups"):
        if hasattr(ours, name):
            assert type(getattr(ours, name)) is int
    assert type(ours.eps) is float
    if make_torch is None:
        return
    theirs = make_torch()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = data((3, 4, 5, 5), 1)
    assert_rel_close(ours(x), theirs(x), VS_TORCH)
    for name, buf in theirs.named_buffers():
        assert_rel_close(getattr(ours, name), buf, VS_TORCH)


@pytest.mark.parametrize("momentum", [torch.tensor(0.2), torch.tensor(0.2, dtype=torch.float64), np.float32(0.2)])
def test_momentum_set_to_a_tensor_or_numpy_number_updates_like_torch_nn(momentum):
    ours, theirs = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    ours.momentum = theirs.momentum = momentum
    x = data((4, 3, 2, 2), 2)
    assert_rel_close(ours(x), theirs(x), VS_TORCH)
    assert_rel_close(ours.running_mean, theirs.running_mean, VS_TORCH)
    assert_rel_close(ours.running_var, theirs.running_var, VS_TORCH)
    ours.eval(), theirs.eval()
    assert_rel_close(ours(x), theirs(x), VS_TORCH)


@pytest.mark.parametrize(
    "bad",
    [True, np.bool_(True), torch.tensor([0.1, 0.2]), torch.tensor([0.1]), torch.tensor(True), "0.1", torch.tensor(1.5)],
    ids=["bool", "np_bool", "two_elements", "one_dim", "bool_tensor", "str", "out_of_range"],
)
def test_bad_momentum_is_refused_and_nothing_changes(bad):
    bn = batchnorm.BatchNorm2d(3)
    bn.momentum = bad
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match="momentum"):
        bn(data((4, 3, 2, 2), 3))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "make,x",
    [
        (lambda: batchnorm.GroupNorm(2, 4), torch.zeros(3, 5, 2)),
        (lambda: batchnorm.InstanceNorm1d(3, track_running_stats=True), torch.zeros(2, 4, 5)),
        (lambda: batchnorm.InstanceNorm2d(3, affine=True), torch.zeros(2, 4, 5, 5)),
    ],
    ids=["group", "instance_tracked", "instance_affine"],
)
def test_wrong_channel_count_is_a_runtime_and_value_error_that_says_what_to_do(make, x):
    """torch.nn raises RuntimeError (GroupNorm) or ValueError (InstanceNorm): ours is both."""
    with pytest.raises(InputError, match="channels|num_features") as info:
        make()(x)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    assert "build" in str(info.value)


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_parametrized_weight_and_weight_norm_hook_are_used():
    """The forward reads parameters from nn.Module's dicts for speed; a parametrization (which moves
    ``weight`` out of ``_parameters``) must still be seen, as torch.nn sees it."""
    from torch.nn.utils import parametrize

    x = data((6, 4, 3, 3), 4)
    ours, theirs = batchnorm.BatchNorm2d(4), nn.BatchNorm2d(4)
    for m in (ours, theirs):
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2.0, 4))
        parametrize.register_parametrization(m, "weight", _Doubled())
    assert "weight" not in ours._parameters
    assert_rel_close(ours(x), theirs(x), VS_TORCH)
    assert_rel_close(ours.eval()(x), theirs.eval()(x), VS_TORCH)
    # the parametrization's gradient reaches the original weight
    ours.train()(x).square().sum().backward()
    theirs.train()(x).square().sum().backward()
    g_ours = ours.parametrizations.weight.original.grad
    assert_rel_close(g_ours, theirs.parametrizations.weight.original.grad, VS_TORCH)
    assert g_ours.abs().sum() > 0


# --- what a torch.nn user can do to a module's attributes ------------------------------------------
def _gated(base):
    class Gated(base):
        """A subclass exposing an effective weight as a property (channel 1 switched off)."""

        @property
        def weight(self):
            w = self._parameters.get("weight")
            if w is None:
                raise AttributeError("weight")
            return w * torch.tensor([1.0, 0.0, 1.0])

    return Gated


def test_a_property_shadowing_weight_is_used_as_torch_nn_uses_it():
    x = data((4, 3, 5, 5), 5)
    ours, theirs = _gated(batchnorm.BatchNorm2d)(3), _gated(nn.BatchNorm2d)(3)
    for m in (ours, theirs):  # (reset_parameters initialised the property's product, not the parameter)
        nn.init.ones_(m._parameters["weight"])
    y = ours(x)
    assert float(y[:, 1].detach().abs().max()) == 0.0  # channel 1's weight is 0 through the property
    assert_rel_close(y, theirs(x), VS_TORCH)


def test_an_instance_attribute_shadowing_a_buffer_is_used_as_torch_nn_uses_it():
    x = data((4, 3, 5, 5), 6)
    ours, theirs = batchnorm.BatchNorm2d(3).eval(), nn.BatchNorm2d(3).eval()
    for m in (ours, theirs):
        m.__dict__["running_mean"] = torch.full((3,), 2.0)
    assert_rel_close(ours(x), theirs(x), VS_TORCH)
    assert float(ours.running_mean.sum()) == 6.0


def test_deleted_counter_raises_like_torch_nn():
    ours, theirs = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    del ours.num_batches_tracked, theirs.num_batches_tracked
    x = data((4, 3, 2, 2), 7)
    with pytest.raises(AttributeError):
        theirs(x)
    with pytest.raises(AttributeError):
        ours(x)


def test_tensor_momentum_from_the_constructor_is_kept_so_schedules_work():
    mom_ours, mom_theirs = torch.tensor(0.1), torch.tensor(0.1)
    ours, theirs = batchnorm.BatchNorm2d(3, momentum=mom_ours), nn.BatchNorm2d(3, momentum=mom_theirs)
    assert ours.momentum is mom_ours
    mom_ours.fill_(1.0), mom_theirs.fill_(1.0)  # a schedule updating the tensor in place
    x = data((4, 3, 2, 2), 8) + 5
    ours(x), theirs(x)
    assert_rel_close(ours.running_mean, theirs.running_mean, VS_TORCH)
    assert float(ours.running_mean.min()) > 4.0  # the new momentum (1.0) was used


def test_group_norm_without_affine_accepts_other_channel_counts_like_torch_nn():
    x = data((2, 4, 5), 9)
    assert_rel_close(batchnorm.GroupNorm(2, 6, affine=False)(x), nn.GroupNorm(2, 6, affine=False)(x), VS_TORCH)


def test_zero_d_tensor_counts_and_numpy_timeout():
    assert batchnorm.BatchNorm2d(torch.tensor(3)).num_features == 3
    gn = batchnorm.GroupNorm(torch.tensor(2), 6)
    assert (gn.num_groups, gn.num_channels) == (2, 6) and type(gn.num_groups) is int
    assert batchnorm.SyncBatchNorm(3, timeout=np.float32(30)).timeout == 30.0
    assert batchnorm.SyncBatchNorm(3, timeout=np.int64(30)).timeout == 30.0
    for bad in (0, -1.0, float("nan"), True, "30"):
        with pytest.raises(InputError, match="timeout"):
            batchnorm.SyncBatchNorm(3, timeout=bad)


@pytest.mark.parametrize("eps", ["1e-5", np.array([1e-5]), None])
def test_eps_of_the_wrong_type_is_a_type_error_as_in_torch_nn(eps):
    with pytest.raises(TypeError, match="eps must be a number") as info:
        batchnorm.BatchNorm2d(3, eps=eps)
    assert isinstance(info.value, RuntimeError)


def test_instance_norm_unbatched_channel_error_names_the_callers_dimension():
    with pytest.raises(InputError, match=r"size at dim=0 .*\(input shape \(4, 5\)\)"):
        batchnorm.InstanceNorm1d(6, affine=True)(torch.randn(4, 5))


# --- torch.func ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda lib: lib.BatchNorm2d(3), lambda lib: lib.InstanceNorm2d(3, affine=True),
                                  lambda lib: lib.GroupNorm(3, 3)], ids=["batch", "instance", "group"])  # fmt: skip
def test_torch_func_transforms_match_torch_nn(make):
    """vmap(grad(functional_call)) per-sample gradients in eval mode, jacrev, and functional_call in training:
    inside a transform nothing may be read on the host (tensors have no storage there)."""
    from torch.func import functional_call, grad, jacrev, vmap

    x = data((5, 3, 4, 4), 10)
    results = []
    for lib in (batchnorm, nn):
        torch.manual_seed(1)
        m = make(lib).eval()
        if getattr(m, "running_mean", None) is not None:
            with torch.no_grad():
                m.running_mean.uniform_(), m.running_var.uniform_(0.5, 2)
        params = {k: v.detach() for k, v in m.named_parameters()}
        per_sample = vmap(grad(lambda p, xi: functional_call(m, p, (xi[None],)).square().sum()),
                          in_dims=(None, 0))(params, x)  # fmt: skip
        jac = jacrev(lambda xx: m(xx).sum(0))(x[:2])
        train = functional_call(m.train(), params, (x,))
        results.append((per_sample, jac, train))
    (g_ours, j_ours, t_ours), (g_theirs, j_theirs, t_theirs) = results
    for k in g_theirs:
        assert_rel_close(g_ours[k], g_theirs[k], VS_TORCH)
    assert_rel_close(j_ours, j_theirs, VS_TORCH)
    assert_rel_close(t_ours, t_theirs, VS_TORCH)


def test_deleted_counter_in_eval_mode_is_not_needed_as_in_torch_nn():
    x = data((4, 3, 2, 2), 11)
    ours, theirs = batchnorm.BatchNorm2d(3).eval(), nn.BatchNorm2d(3).eval()
    del ours.num_batches_tracked, theirs.num_batches_tracked
    assert_rel_close(ours(x), theirs(x), VS_TORCH)


def test_a_getattr_override_is_used_as_torch_nn_uses_it():
    def with_getattr(base):
        class Scaled(base):
            def __getattr__(self, name):
                value = super().__getattr__(name)
                return value * 0 + 5.0 if name == "running_var" else value

        return Scaled

    x = data((4, 3, 2, 2), 12)
    assert_rel_close(with_getattr(batchnorm.BatchNorm2d)(3).eval()(x), with_getattr(nn.BatchNorm2d)(3).eval()(x),
                     VS_TORCH)  # fmt: skip


class _ChunkedBN(nn.Module):
    """Ghost batch norm written with torch.nn: BatchNorm2d over each chunk of 3 samples."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        return torch.cat([self.bn(c) for c in x.split(3)])


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: batchnorm.InstanceNorm2d(3, track_running_stats=True),
         lambda: nn.InstanceNorm2d(3, track_running_stats=True)),
        (lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=3, track_running_stats=False), _ChunkedBN),
        (lambda: batchnorm.BatchNorm2d(3, track_running_stats=False), lambda: nn.BatchNorm2d(3, track_running_stats=False)),
    ],
    ids=["instance_tracked", "ghost", "batch_untracked"],
)
def test_training_under_grad_and_jacrev_matches_torch_nn(ours, theirs):
    """Training-mode forwards inside torch.func.grad / jacrev (ghost's custom autograd Function included);
    instance norm's running statistics are updated as torch.nn updates them."""
    from torch.func import grad, jacrev

    x, r = data((6, 3, 4, 4), 13), data((6, 3, 4, 4), 15)  # (sum of y^2 is constant under BN: weight it)
    out = []
    for make in (ours, theirs):
        m = make().train()
        g = grad(lambda i: (m(i) * r).sum())(x)
        j = jacrev(lambda i: m(i).sum((0, 2, 3)))(x)
        out.append((g, j, getattr(m, "running_mean", None)))
    (g1, j1, r1), (g2, j2, r2) = out
    assert_rel_close(g1, g2, VS_TORCH)
    assert_rel_close(j1, j2, VS_TORCH)
    if r2 is not None:
        assert_rel_close(r1, r2, VS_TORCH)
        assert float(r2.abs().sum()) > 0


def test_ghost_under_vmap_matches_per_sample_batch_norm():
    from torch.func import vmap

    x = data((2, 6, 3, 4, 4), 14)
    ours, theirs = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=3, track_running_stats=False), _ChunkedBN()
    assert_rel_close(vmap(ours)(x), vmap(theirs)(x), VS_TORCH)


@pytest.mark.parametrize("make", [lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
                                  lambda: batchnorm.BatchRenorm2d(3)], ids=["ghost", "renorm"])  # fmt: skip
def test_jit_trace_of_a_variant_in_training_mode_refuses_and_eval_mode_traces(make):
    """torch.jit.trace records torch.nn's op; a variant's training statistics are not that op, so tracing
    them would silently export plain batch norm: refused, nothing changed. Eval mode traces exactly."""
    x = data((8, 3, 4, 4), 16)
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match="eval mode"):
            torch.jit.trace(m, x, check_trace=False)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        traced = torch.jit.trace(m.eval(), x, check_trace=False)
    assert_rel_close(traced(x), m(x), F32)
