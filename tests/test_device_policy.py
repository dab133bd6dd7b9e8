"""No host reads of device data on the CUDA hot path (training and eval, forward and backward).

No GPU is needed: (1) every module runs its CUDA code path on *fake* CUDA tensors
(``FakeTensorMode``), where any read of tensor values on the host - ``bool(t)``, ``.item()``,
``.tolist()``, ``.numpy()`` - raises ``DataDependentOutputException``; (2) on the CPU under
``device_policy()`` (CPU tensors treated as device tensors), with every host read of tensor data
patched to fail except inside the one allowed reader (``PrecisionState.decide``), the deferred
precision decision is exercised end to end: the step after an off-centre batch is exact.
"""

import contextlib

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import batchnorm
from batchnorm import reference as R
from batchnorm.functional import stats as S
from tolerances import REL_TOL, assert_rel_close, rel_err

F32 = REL_TOL[torch.float32]

#: (module factory, input shape, modes): every module of the library that a CUDA model would hold
MODULES = {
    "BatchNorm1d": (lambda **f: batchnorm.BatchNorm1d(8, **f), (16, 8)),
    "BatchNorm2d": (lambda **f: batchnorm.BatchNorm2d(8, **f), (4, 8, 5, 5)),
    "BatchNorm2d momentum=None": (lambda **f: batchnorm.BatchNorm2d(8, momentum=None, **f), (4, 8, 5, 5)),
    "BatchNorm2d no running stats": (lambda **f: batchnorm.BatchNorm2d(8, track_running_stats=False, **f),
                                     (4, 8, 5, 5)),
    "BatchNorm3d bf16": (lambda **f: batchnorm.BatchNorm3d(8, **f), (2, 8, 3, 4, 4)),
    "BatchNormAct2d (Triton)": (lambda **f: batchnorm.BatchNormAct2d(8, **f), (4, 8, 5, 5)),
    "GhostBatchNorm2d": (lambda **f: batchnorm.GhostBatchNorm2d(8, virtual_batch_size=2, **f), (4, 8, 5, 5)),
    "BatchRenorm2d": (lambda **f: batchnorm.BatchRenorm2d(8, **f), (4, 8, 5, 5)),
    "FrozenBatchNorm2d": (lambda **f: batchnorm.FrozenBatchNorm2d(8, **f), (4, 8, 5, 5)),
    "SyncBatchNorm (one process)": (lambda **f: batchnorm.SyncBatchNorm(8, **f), (4, 8, 5, 5)),
    "GroupNorm": (lambda **f: batchnorm.GroupNorm(2, 8, **f), (4, 8, 5, 5)),
    "LayerNorm": (lambda **f: batchnorm.LayerNorm([8, 5, 5], **f), (4, 8, 5, 5)),
    "InstanceNorm2d": (lambda **f: batchnorm.InstanceNorm2d(8, affine=True, **f), (4, 8, 5, 5)),
    "InstanceNorm2d tracked": (lambda **f: batchnorm.InstanceNorm2d(8, track_running_stats=True, **f), (4, 8, 5, 5)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODULES))
def test_cuda_forward_never_reads_device_data(name, monkeypatch):
    """Training and eval forward on fake CUDA tensors: the real CUDA branches (backend choice, precision
    policy, Triton ops' fake kernels). The CPU build of PyTorch cannot run autograd on fake CUDA tensors
    (no CUDA device guard), so backward is covered by the read-guard test below; nor can it fake the
    native kernels' in-place writes (the running update inside the kernel, ``out=``), so those two are
    replaced by out-of-place calls here (the Python around them, which is what could read,
    runs unchanged)."""
    from batchnorm.functional import normalize
    from batchnorm.functional.backends import Aten

    def native_into(*args, out, save_mean, save_invstd):  # fake tensors hold no values: compute, skip the write
        assert torch.native_batch_norm(*args)[0].shape == out.shape

    monkeypatch.setattr(Aten, "updates_in_kernel", False)
    monkeypatch.setattr(normalize, "_native_into", native_into)
    make, shape = MODULES[name]
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    with FakeTensorMode(), torch.no_grad():
        m = make(device="cuda").requires_grad_(False)  # (autograd on fake CUDA needs a CUDA build)
        for _ in range(2):
            y = m.train()(torch.randn(shape, device="cuda", dtype=dtype))
            assert y.is_cuda and y.shape == shape
        assert m.eval()(torch.randn(shape, device="cuda", dtype=dtype)).shape == shape


# --- the deferred decision, on the CPU under device_policy() with a read guard ---------------------------

_READS = ("__bool__", "item", "tolist", "numpy", "__int__", "__float__", "__index__", "__array__")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any read of tensor data on the host fails, except inside ``stats.host_read()`` (PrecisionState.decide)."""
    reads = []

    def guard(name, original):
        def checked(self, *args, **kwargs):
            if not S.host_read_allowed():
                raise AssertionError(f"host read of tensor data: Tensor.{name}")
            reads.append(name)
            return original(self, *args, **kwargs)

        return checked

    with monkeypatch.context() as patch, S.device_policy():
        for name in _READS:
            patch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        yield reads


def _offset_batches(shape, offset, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) + offset).float() for _ in range(steps)]


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"BatchNormAct2d (Triton)"}))
def test_device_path_reads_only_through_precision_state(name, monkeypatch):
    """Forward and backward, training and eval, centred and at mean 1e6, with every host read of
    tensor data failing outside PrecisionState.decide. (The Triton module's launches are checked by
    tests/kernels; on the CPU its backend is the interpreter, which reads on the host by design.)"""
    make, shape = MODULES[name]
    m = make()
    if "bf16" in name:
        m = m.to(torch.float32)
    batches = _offset_batches(shape, 0.0, 2) + _offset_batches(shape, 1e6, 2, seed=1)
    with no_host_reads(monkeypatch) as reads:
        for x in batches:
            m(x.clone().requires_grad_(True)).sum().backward()
        m.eval()
        m(batches[0])
    assert set(reads) <= {"__bool__"}  # PrecisionState.decide reading its own host copy


def test_deferred_decision_makes_the_next_step_exact(monkeypatch):
    """Step 1 at mean 1e6 has torch.nn's precision (the flag is only published); step 2 is exact."""
    bn = batchnorm.BatchNorm2d(3, momentum=None)
    x1, x2 = _offset_batches((8, 3, 4, 4), 1e6, 2, seed=2)
    with no_host_reads(monkeypatch):
        y1 = bn(x1)
        assert not bn._precision.value  # published, not yet decided
        y2 = bn(x2)
        assert bn._precision.value  # decided from step 1's flag: step 2 was shifted
    err1 = rel_err(y1, R.batch_norm_train(x1.double().numpy())[0])
    err2 = rel_err(y2, R.batch_norm_train(x2.double().numpy())[0])
    assert err1 > 1e-3, "step 1 is expected to be at torch.nn's precision (nothing read yet)"
    assert err2 < F32, f"step 2 must be exact: {err2:.2e}"
    # the running statistics: the cumulative average of the two batches' statistics
    m1, m2 = (x.double().mean((0, 2, 3)) for x in (x1, x2))
    assert_rel_close(bn.running_mean, (m1 + m2) / 2, F32, "running_mean")
    # back on the host policy (the CPU's own), the decision is immediate again
    x3 = _offset_batches((8, 3, 4, 4), 1e6, 1, seed=3)[0]
    assert rel_err(batchnorm.BatchNorm2d(3)(x3), R.batch_norm_train(x3.double().numpy())[0]) < F32


def test_precision_state_is_not_state_dict_and_copies_fresh():
    import copy
    import pickle

    bn = batchnorm.BatchNorm2d(3)
    bn._precision.value = True
    assert "_precision" not in "".join(bn.state_dict())
    assert copy.deepcopy(bn)._precision.value is False
    assert pickle.loads(pickle.dumps(bn))._precision.value is False
    assert np.isfinite(bn(torch.randn(4, 3, 2, 2)).detach().numpy()).all()


def _ghost_ref(x, v=2):
    return np.concatenate([R.batch_norm_train(part)[0] for part in np.split(x, range(v, x.shape[0], v))])


#: module -> float64 reference of its training output
DEFERRED = {
    "BatchNorm2d": lambda x: R.batch_norm_train(x)[0],
    "GhostBatchNorm2d": _ghost_ref,
    "GroupNorm": lambda x: R.group_norm(x, 2),
    "LayerNorm": lambda x: R.layer_norm(x, (8, 5, 5)),
    "InstanceNorm2d": R.instance_norm,
}


@pytest.mark.parametrize("name", sorted(DEFERRED))
def test_deferred_pivot_shift_is_exact_for_every_norm(name, monkeypatch):
    """The step after an off-centre one shifts by the first value of each channel/group (the device
    pivot): exact to float32 rounding for every norm."""
    make, shape = MODULES[name]
    m = make()
    x1, x2 = _offset_batches(shape, 1e6, 2, seed=4)
    with no_host_reads(monkeypatch):
        m(x1)
        y2 = m(x2)
    assert m._precision.value
    assert_rel_close(y2, DEFERRED[name](x2.double().numpy()), F32, f"{name}, step after the flag")
