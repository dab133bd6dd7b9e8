"""Run benchmarks/compiled.py against the kernels of main before issue 13 (commit f2d70d0): a one-off adapter.

    git worktree add /tmp/before f2d70d0 && cp benchmarks/compiled.py docs/results/compiled/run_before.py /tmp/before/
    cd /tmp/before && mv compiled.py benchmarks/ && python run_before.py --out /tmp/before_out
"""
import sys, types
sys.path.insert(0, "/tmp/before/src"); sys.path.insert(0, "/tmp/before")
import torch
from batchnorm.kernels import _jit, launch
assert launch.__file__.startswith("/tmp/before"), launch.__file__
_jit.STREAMED = {
    "bn_stats_partial_kernel": {"X": ("r", None)},
    "bn_apply_kernel": {"X": ("r", None), "Y": ("w", None), "R": ("r", "HAS_RES")},
    "bn_bwd_reduce_kernel": {"DY": ("r", None), "X": ("r", None), "R": ("r", "HAS_RES"), "G": ("w", "WRITE_G")},
    "bn_bwd_dx_kernel": {"DY": ("r", None), "X": ("r", None), "DX": ("w", None)},
}
class Rec:
    def __init__(self, fn): self.fn = fn; self.__name__ = fn.__name__
    def __getitem__(self, grid):
        return lambda *a, **kw: launch._launch(self.fn, grid, a, kw)
ns = types.SimpleNamespace(**{k: Rec(getattr(_jit, k)) for k in dir(_jit) if k.endswith("_kernel")})
launch._jit = ns
launch._launch = lambda fn, grid, a, kw: None
launch.H100 = types.SimpleNamespace(name="H100 SXM (sm_90)", sm_count=132,
    resident_programs=lambda regs, warps, shared: max(0, min(65536 // (-(-regs * 32 // 256) * 256 * warps), 2048 // (32 * warps), (228 * 1024) // shared if shared else 32, 32)))
for name in ("train_forward", "infer_forward", "backward"):
    f = getattr(launch, name)
    def wrap(*a, _f=f, device=None, **kw):
        return _f(*a, tile=4096, programs=4 * 132, **kw)
    setattr(launch, name, wrap)
import benchmarks.compiled as C
sys.exit(C.main(sys.argv[1:]))
