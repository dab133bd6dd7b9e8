"""PyTorch's own test material against this library: the ModuleInfo entries of
``torch.testing._internal.common_modules`` for every torch.nn norm module this library replaces,
and the OpInfo samples of ``F.batch_norm``, ``F.group_norm``, ``F.layer_norm`` and
``F.instance_norm`` - outputs, every gradient, every buffer, state_dict, repr and pickling, in
float32 and float64, contiguous and channels_last. The only samples left out are the documented
differences of docs/compat.md, each named in :data:`DIFFERENCES` with its reason."""

import copy
import io
import pickle

import pytest
import torch

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install batchnorm[dev])")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import batchnorm  # noqa: E402
from batchnorm import functional as BF  # noqa: E402
from tolerances import REL_TOL_VS_TORCH, assert_rel_close  # noqa: E402

OURS = {
    torch.nn.BatchNorm1d: batchnorm.BatchNorm1d,
    torch.nn.BatchNorm2d: batchnorm.BatchNorm2d,
    torch.nn.BatchNorm3d: batchnorm.BatchNorm3d,
    torch.nn.GroupNorm: batchnorm.GroupNorm,
    torch.nn.LayerNorm: batchnorm.LayerNorm,
    torch.nn.InstanceNorm1d: batchnorm.InstanceNorm1d,
    torch.nn.InstanceNorm2d: batchnorm.InstanceNorm2d,
    torch.nn.InstanceNorm3d: batchnorm.InstanceNorm3d,
}
FUNCTIONS = {
    "nn.functional.batch_norm": (torch.nn.functional.batch_norm, BF.batch_norm),
    "nn.functional.group_norm": (torch.nn.functional.group_norm, BF.group_norm),
    "nn.functional.layer_norm": (torch.nn.functional.layer_norm, BF.layer_norm),
    "nn.functional.instance_norm": (torch.nn.functional.instance_norm, BF.instance_norm),
}


def _is_negative_eps(args, kwargs):
    eps = kwargs.get("eps")
    return isinstance(eps, float) and eps < 0


def _momentum_outside_unit_interval(args, kwargs):
    # F.batch_norm / F.instance_norm: momentum is the 6th argument after the input
    m = kwargs.get("momentum", args[5] if len(args) > 5 else None)
    return isinstance(m, (int, float)) and not isinstance(m, bool) and not 0 <= m <= 1


#: documented differences (docs/compat.md): (predicate on the sample's (args, kwargs), reason)
DIFFERENCES = {
    "negative eps": (_is_negative_eps, "a negative eps is rejected (it gives NaN where var < |eps|)"),
    "momentum outside [0, 1]": (_momentum_outside_unit_interval,
                                "momentum is the new batch's weight; outside [0, 1] it is rejected"),
}  # fmt: skip


def _rstd_bound(name, x, args, kwargs) -> float:
    """Largest ``1 / sqrt(var + eps)`` over the op's normalization groups, in float64: the size of the
    terms an input gradient is a cancellation of (its rounding is relative to them)."""
    x = x.detach().double()
    eps = kwargs.get("eps", 1e-5)
    if name == "nn.functional.layer_norm":
        dims = tuple(range(x.dim() - len(args[0]), x.dim()))
    elif name == "nn.functional.group_norm":
        x, dims = x.reshape(x.shape[0], args[0], -1), (2,)
    elif name == "nn.functional.instance_norm":
        dims = tuple(range(2, x.dim()))
    else:
        dims = (0,) + tuple(range(2, x.dim()))
    if not x.numel():
        return 1.0
    return float(torch.rsqrt(x.var(dims, unbiased=False) + eps).max())


def _difference(args, kwargs):
    return next((name for name, (hit, _) in DIFFERENCES.items() if hit(args, kwargs)), None)


MODULE_INFOS = [mi for mi in module_db if mi.module_cls in OURS]


def _has_4d_or_5d_input(mi) -> bool:
    samples = mi.module_inputs_func(mi, device="cpu", dtype=torch.float32, requires_grad=False, training=True)
    return any(isinstance(a, torch.Tensor) and a.dim() in (4, 5) for s in samples for a in s.forward_input.args)


#: (ModuleInfo, layout): channels_last only where PyTorch's material has 4-D/5-D inputs
CASES = [(mi, "contiguous") for mi in MODULE_INFOS] + [(mi, "channels_last") for mi in MODULE_INFOS
                                                         if _has_4d_or_5d_input(mi)]  # fmt: skip


def _channels_last(t):
    if isinstance(t, torch.Tensor) and t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.detach().to(memory_format=fmt).requires_grad_(t.requires_grad)
    return t


def _clone(t):
    return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


@pytest.mark.parametrize("mi,layout", CASES, ids=lambda v: getattr(getattr(v, "module_cls", None), "__name__", v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_module_info_entries(mi, layout, dtype, training):
    tol = REL_TOL_VS_TORCH[dtype]
    seen = 0
    for sample in mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True, training=training):
        c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        if _difference(c_args, c_kwargs):
            continue
        theirs = mi.module_cls(*c_args, **c_kwargs).to(dtype).train(training)
        ours = OURS[mi.module_cls](*c_args, **c_kwargs).to(dtype).train(training)
        assert isinstance(ours, mi.module_cls)
        ours.load_state_dict(theirs.state_dict())
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert repr(ours) == repr(theirs)
        f_args = [_channels_last(a) if layout == "channels_last" else a for a in sample.forward_input.args]
        f_kwargs = sample.forward_input.kwargs
        if layout == "channels_last" and not any(isinstance(a, torch.Tensor) and a.dim() in (4, 5) for a in f_args):
            continue
        a_args, b_args = [_clone(a) for a in f_args], [_clone(a) for a in f_args]
        ya, yb = ours(*a_args, **f_kwargs), theirs(*b_args, **f_kwargs)
        what = f"{mi.module_cls.__name__}{c_args}{c_kwargs} {sample.desc} {dtype} {layout} training={training}"
        assert ya.shape == yb.shape and ya.dtype == yb.dtype, what
        if layout == "channels_last" and yb.dim() in (4, 5):  # where torch.nn keeps channels_last, so do we
            fmt = torch.channels_last if yb.dim() == 4 else torch.channels_last_3d
            assert ya.is_contiguous(memory_format=fmt) or not yb.is_contiguous(memory_format=fmt), what
        assert_rel_close(ya, yb, tol, f"{what}: output")
        if yb.numel():
            dy = torch.randn_like(yb)
            ya.backward(dy)
            yb.backward(dy)
            for a, b in zip(a_args, b_args):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    assert_rel_close(a.grad, b.grad, tol, f"{what}: input grad", scale=float(dy.norm()))
            for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
                assert (pa.grad is None) == (pb.grad is None), f"{what}: {name}.grad"
                if pb.grad is not None:
                    assert_rel_close(pa.grad, pb.grad, tol, f"{what}: {name}.grad", scale=float(dy.norm()))
        empty_step = training and any(isinstance(a, torch.Tensor) and not a.numel() for a in f_args)
        for (name, ba), (_, bb) in zip(ours.named_buffers(), theirs.named_buffers()):
            if empty_step and name == "num_batches_tracked":  # documented: an empty batch is not a step here
                assert int(ba) == int(bb) - 1, f"{what}: {name}"
            elif bb.is_floating_point():
                assert_rel_close(ba, bb, tol, f"{what}: buffer {name}")
            else:
                assert torch.equal(ba, bb), f"{what}: buffer {name}: {ba} vs {bb}"
        # pickling (torch.save of the whole module) keeps class, state and function
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert type(again) is type(ours) and pickle.loads(pickle.dumps(ours)).state_dict().keys() == ours.state_dict().keys()
        copy.deepcopy(ours)
        again.eval(), ours.eval()
        x_eval = [_clone(a).detach() if isinstance(a, torch.Tensor) else a for a in f_args]
        if all(not isinstance(a, torch.Tensor) or a.numel() for a in x_eval):
            assert_rel_close(again(*x_eval, **f_kwargs), ours(*x_eval, **f_kwargs), 0.0, f"{what}: after pickling")
        seen += 1
    assert seen > 0


OP_INFOS = [op for op in op_db if op.name in FUNCTIONS]


@pytest.mark.parametrize("op", OP_INFOS, ids=lambda op: f"{op.name}.{op.variant_test_name}".rstrip("."))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_info_samples(op, dtype):
    tol = REL_TOL_VS_TORCH[dtype]
    theirs_fn, ours_fn = FUNCTIONS[op.name]
    seen = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
        args, kwargs = list(sample.args), dict(sample.kwargs)
        if _difference(args, kwargs):
            continue
        a_in, b_in = _clone(sample.input), _clone(sample.input)
        a_args, b_args = [_clone(a) for a in args], [_clone(a) for a in args]
        a_kw = {k: _clone(v) for k, v in kwargs.items()}
        b_kw = {k: _clone(v) for k, v in kwargs.items()}
        ya, yb = ours_fn(a_in, *a_args, **a_kw), theirs_fn(b_in, *b_args, **b_kw)
        what = f"{op.name} input {tuple(sample.input.shape)} args {[getattr(a, 'shape', a) for a in args]} " \
               f"kwargs { {k: getattr(v, 'shape', v) for k, v in kwargs.items()} } {dtype}"  # fmt: skip
        assert_rel_close(ya, yb, tol, f"{what}: output")
        for a, b in zip(a_args + list(a_kw.values()), b_args + list(b_kw.values())):  # mutated running buffers
            if isinstance(b, torch.Tensor) and not b.requires_grad:
                assert_rel_close(a, b, tol, f"{what}: buffer")
        if yb.requires_grad and yb.numel():
            dy = torch.randn_like(yb)
            diff = [t for t in [a_in] + a_args + list(a_kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            ref = [t for t in [b_in] + b_args + list(b_kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            ga = torch.autograd.grad(ya, diff, dy, allow_unused=True)
            gb = torch.autograd.grad(yb, ref, dy, allow_unused=True)
            scale = float(dy.norm()) * max(1.0, _rstd_bound(op.name, sample.input, args, kwargs))
            for g1, g2 in zip(ga, gb):
                assert (g1 is None) == (g2 is None), what
                if g2 is not None:
                    assert_rel_close(g1, g2, tol, f"{what}: grad", scale=scale)
        seen += 1
    assert seen > 0
