"""Run benchmarks/compiled.py against the kernels of main before issue 13 (commit f2d70d0): a one-off adapter.

    git worktree add /tmp/before f2d70d0
    cp benchmarks/compiled.py /tmp/before/benchmarks/ && cp docs/results/compiled/run_before.py /tmp/before/
    cd /tmp/before && python run_before.py --out /tmp/before_out

The old launchers call ``_jit.<kernel>[grid](...)`` directly and size their plan from
``x.is_cuda``; here the kernels are wrapped so every launch reaches ``launch._launch`` (which
compiled.py records), and the launchers get the H100 plan the old code would make on a GPU:
``tile=4096`` and ``programs = 4 programs/SM x 132 SMs``.
"""

import sys
import types

sys.path.insert(0, "/tmp/before/src")
sys.path.insert(0, "/tmp/before")

from batchnorm.kernels import _jit, launch  # noqa: E402

assert launch.__file__.startswith("/tmp/before"), launch.__file__
_jit.STREAMED = {
    "bn_stats_partial_kernel": {"X": ("r", None)},
    "bn_apply_kernel": {"X": ("r", None), "Y": ("w", None), "R": ("r", "HAS_RES")},
    "bn_bwd_reduce_kernel": {"DY": ("r", None), "X": ("r", None), "R": ("r", "HAS_RES"), "G": ("w", "WRITE_G")},
    "bn_bwd_dx_kernel": {"DY": ("r", None), "X": ("r", None), "DX": ("w", None)},
}


class Recorded:
    def __init__(self, fn):
        self.fn, self.__name__ = fn, fn.__name__

    def __getitem__(self, grid):
        return lambda *a, **kw: launch._launch(self.fn, grid, a, kw)


def resident(regs, warps, shared):
    by_regs = 65536 // (-(-regs * 32 // 256) * 256 * warps)
    return max(0, min(by_regs, 2048 // (32 * warps), (228 * 1024) // shared if shared else 32, 32))


launch._jit = types.SimpleNamespace(**{k: Recorded(getattr(_jit, k)) for k in dir(_jit) if k.endswith("_kernel")})
launch._launch = lambda fn, grid, a, kw: None
launch.H100 = types.SimpleNamespace(name="H100 SXM (sm_90)", sm_count=132, resident_programs=resident)
for name in ("train_forward", "infer_forward", "backward"):
    def wrap(*a, _f=getattr(launch, name), device=None, **kw):
        return _f(*a, tile=4096, programs=4 * 132, **kw)

    setattr(launch, name, wrap)

import benchmarks.compiled as compiled  # noqa: E402

sys.exit(compiled.main(sys.argv[1:]))
