"""Compiled-code check of the Triton kernels for an H100 (sm_90), run on the CPU: no GPU, no driver.

    python benchmarks/compiled.py                  # every case; exit 1 if a check fails
    python benchmarks/compiled.py --quick          # a few cases (the test suite runs this)
    python benchmarks/compiled.py --out DIR        # also write DIR/compiled.json and DIR/compiled.md

What it does
------------
1. For a table of real shapes (ResNet-50's batch-norm layers at batch 32 and 128, few
   channels with a huge spatial extent, a 2-D and a small input) x NCHW / channels_last x
   float32 / bfloat16 / float16 x {identity, relu, relu + residual}, it runs the real
   launchers (:mod:`batchnorm.kernels.launch`: training forward, backward, inference) on
   ``meta`` tensors against a model of an H100 SXM (132 SMs) and records every launch they
   make: kernel, grid, arguments.
2. Each launch is specialized exactly as Triton's JIT would specialize it on the GPU (its
   own binder: pointer alignment, integers divisible by 16 or equal to 1, constexprs) and
   every distinct variant is compiled ahead of time for ``GPUTarget("cuda", 90, 32)`` with
   ``triton.compile(ASTSource(...))`` and the ptxas that ships with Triton. The occupancy
   the launchers size their grid from is taken from the same compiled code.
3. Per variant it reads registers per thread and local-memory (spill) bytes from the cubin
   (``cuobjdump --dump-resource-usage``, also bundled), and the width of every global load
   and store the PTX issues for an activation-sized tensor (the ``.loc`` line of each
   ``ld.global``/``st.global`` is a ``_offsets(...)`` line of ``_jit.py``).
4. Per path (train forward, backward, inference) it adds up the bytes the launches stream
   per element (from :data:`batchnorm.kernels._jit.STREAMED`) against the minimum (every
   input read once, every output written once).

Checks (exit status 1 and a FAIL row when one fails):

* no spills (0 bytes of local memory);
* at least 2 programs of every streaming kernel resident per SM (registers, warps, shared);
* the streaming loads are as wide as the layout allows: 16 bytes, or the largest power of
  two that divides every stride across the unit-stride axis, the extent along it, and the
  16-byte pointer alignment (e.g. NCHW 7x7 rows of 49 values: 4 bytes for float32).

Needs the ``triton`` package only (checked with 3.6 and 3.9; 3.2's JIT binder differs): it uses
Triton's JIT binder and compiler internals, and says so when they differ. Set ``TRITON_CACHE_DIR`` to reuse compiled
variants; by default a fresh temporary cache is used, so the timing is that of a cold run.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks/compiled.py compiles for the GPU: unset TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set only to silence 3.9's notice

import torch  # noqa: E402

from benchmarks.harness import markdown_table  # noqa: E402

# ResNet-50 batch-norm layers (torchvision v1.5): (C, H = W, has a fused residual add)
RESNET50_BN = [
    (64, 112, False), (64, 56, False), (256, 56, True), (128, 56, False), (128, 28, False), (512, 28, True),
    (256, 28, False), (256, 14, False), (1024, 14, True), (512, 14, False), (512, 7, False), (2048, 7, True),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: (activation, residual) variants: plain BN, BN + ReLU, BN + add + ReLU
EPILOGUES = (("identity", False), ("relu", False), ("relu", True))
MIN_RESIDENT = 2


def cases(quick: bool):
    """``(group, shape, layout)`` rows of the table."""
    out = []
    layers = RESNET50_BN if not quick else [RESNET50_BN[1], RESNET50_BN[8], RESNET50_BN[11]]
    for batch in ((32, 128) if not quick else (32,)):
        for c, h, _add in layers:
            for layout in ("nchw", "channels_last"):
                out.append(("resnet50", (batch, c, h, h), layout))
    out += [("few-channel", (16, 4, 512, 512), "nchw"), ("few-channel", (16, 4, 512, 512), "channels_last"),
            ("few-channel", (20, 6, 65536), "nchw")]
    if not quick:
        out += [("2-D", (256, 1000), "nchw"), ("small", (8, 64, 14, 14), "nchw"),
                ("small", (8, 64, 14, 14), "channels_last")]
    return out


def meta_tensor(shape, dtype, layout):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


# --- recording the launches ---------------------------------------------------------------


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    key: str = ""  # the specialization key (set when compiled)


@dataclass
class PathRecord:
    group: str
    shape: tuple
    layout: str
    dtype: str
    epilogue: str
    path: str  # train_fwd / backward / infer
    launches: list = field(default_factory=list)
    numel: int = 0
    elsize: int = 0
    min_bytes: int = 0  # per element: inputs read once + outputs written once
    allowed: int = 16  # widest access (bytes) the layout allows for its streamed tensors


class Fake:
    """What Triton's binder sees of a tensor argument: its dtype and its data pointer (a
    512-byte aligned base plus the view's storage offset, as the CUDA caching allocator gives)."""

    BASE = 1 << 40

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self.ptr = self.BASE + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self.ptr


# --- compiling ------------------------------------------------------------------------------


class Compiler:
    """Ahead-of-time compiles for sm_90 with Triton's own specialization rules; caches by key."""

    def __init__(self):
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
            from triton.compiler.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature
        except ImportError as e:  # pragma: no cover - depends on the installed Triton
            sys.exit(f"benchmarks/compiled.py needs Triton's compiler internals (checked with Triton 3.6 and 3.9): {e}")
        import triton

        self.triton, self.ASTSource = triton, ASTSource
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.make_binder = create_function_from_signature
        self.binders = {}
        self.results = {}  # key -> Variant
        self.bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

    def specialize(self, fn, args, kwargs):
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = self.make_binder(fn.signature, fn.params, self.backend)
        args = tuple(Fake(a) if isinstance(a, torch.Tensor) else a for a in args)
        try:
            bound, spec, opts = binder(*args, **kwargs)
        except ValueError as e:  # Triton 3.2's binder returns other things
            sys.exit(f"benchmarks/compiled.py: Triton {self.triton.__version__}'s JIT binder differs from 3.6's: {e}")
        options, signature, constexprs, attrs = fn._pack_args(self.backend, dict(kwargs), bound, spec, opts)
        key = f"{fn.__name__}|{signature}|{constexprs}|{attrs}|{options.num_warps}"
        return key, (signature, constexprs, attrs, options)

    def compile(self, fn, args, kwargs):
        key, (signature, constexprs, attrs, options) = self.specialize(fn, args, kwargs)
        if key not in self.results:
            kernel = self.triton.compile(self.ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                         options=options.__dict__)
            self.results[key] = self.analyze(fn, kernel, options.num_warps, constexprs)
        return key, self.results[key]

    def analyze(self, fn, kernel, num_warps, constexprs):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(self.bindir / "cuobjdump"), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        loads, stores = streaming_accesses(kernel.asm["ptx"])
        return Variant(name=fn.__name__, regs=int(res["REG"]), spill=int(res["LOCAL"]) + int(res["STACK"]),
                       shared=max(int(res["SHARED"]), int(getattr(kernel.metadata, "shared", 0))),
                       num_warps=num_warps, loads=loads, stores=stores,
                       meta={str(k): v for k, v in constexprs.items()})


@dataclass
class Variant:
    name: str
    regs: int
    spill: int
    shared: int
    num_warps: int
    loads: list  # widths in bytes of the streaming loads
    stores: list
    meta: dict

    def resident(self, device) -> int:
        return device.resident_programs(self.regs, self.num_warps, self.shared)


#: helpers whose code runs only inside the streaming (tile) loops
LOOP_HELPERS = ("_tile", "_offsets", "_mult", "_act", "_act_grad")


def _streaming_lines() -> set:
    """Source lines of ``_jit.py`` inside the kernels' tile loops (``for t in range(...)``) and
    of the helpers only those loops call: the ``.loc`` of every streaming access is one of them
    (the compiler may attribute a load to a later line of the loop body that uses it)."""
    from batchnorm.kernels import _jit

    src = Path(_jit.__file__).read_text().splitlines()
    lines, body_indent = set(), None
    for i, line in enumerate(src):
        indent = len(line) - len(line.lstrip())
        if body_indent is not None and line.strip() and indent <= body_indent:
            body_indent = None
        if body_indent is not None:
            lines.add(i + 1)
        m = re.match(r"(\s*)for t in range\(", line) or re.match(r"def (%s)\(" % "|".join(LOOP_HELPERS), line)
        if m:
            lines.add(i + 1)
            body_indent = indent
    return lines


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def streaming_accesses(ptx: str):
    """Widths (bytes) of the PTX global loads (``ld.global``, and ``cp.async`` where Triton
    pipelines a loop through shared memory) and stores issued from the tile loops of ``_jit.py``."""
    lines = _streaming_lines()
    jit_file = None
    for m in re.finditer(r'\.file\s+(\d+)\s+"([^"]+)"', ptx):
        if m.group(2).endswith("_jit.py"):
            jit_file = m.group(1)
    loads, stores, here = [], [], False
    for raw in ptx.splitlines():
        line = raw.strip()
        if line.startswith(".loc"):
            parts = line.split()
            here = parts[1] == jit_file and int(parts[2]) in lines
            continue
        if not here:
            continue
        cp = _CP_ASYNC.search(line)
        if cp:
            loads.append(int(cp.group(1), 0))
            continue
        m = _ACCESS.search(line)
        if m:
            mods = m.group(2).split(".")
            vec = 4 if "v4" in mods else 2 if "v2" in mods else 1
            bits = [int(b[1:]) for b in mods if re.fullmatch(r"[bfsu](8|16|32|64)", b)]
            (loads if m.group(1) == "ld" else stores).append(vec * (bits[-1] if bits else 32) // 8)
    return loads, stores


# --- running the launchers --------------------------------------------------------------------


def allowed_width(views, elsize):
    """Widest access (bytes, <= 16) the layout allows: per view, the largest power of two
    dividing the bytes of every stride across its unit-stride axis and its extent along it
    (a view with no unit-stride axis among C and the flattened spatial axis: one element)."""
    best = 16
    for t in views:
        n, c = t.shape[:2]
        s = math.prod(t.shape[2:])
        sn, sc = t.stride()[:2]
        ss = t.stride()[-1] if t.dim() > 2 else sn
        if s > 1 and ss == 1 and t.dim() > 2:
            across, extent = [sc, sn], s
        elif sc == 1:
            across, extent = [ss, sn] if t.dim() > 2 else [sn], c
        else:
            return elsize
        width = 16
        for v in [a for a in across if a != 0] + [extent]:
            while width > elsize and (v * elsize) % width:
                width //= 2
        best = min(best, width)
    return best


def record_paths(shape, layout, dtype, epilogue, group, compiler, device):
    """Run the three launchers on meta tensors; return a PathRecord per path."""
    from batchnorm.kernels import launch

    act, res = epilogue
    x = meta_tensor(shape, dtype, layout)
    r = meta_tensor(shape, dtype, layout) if res else None
    c = shape[1]
    w = torch.empty(c, device="meta", dtype=torch.float32)
    stat = torch.empty(c, device="meta", dtype=torch.float32)
    elsize = x.element_size()
    recs = []
    name = f"{act}{' + residual' if res else ''}"

    def run(path, fn, views, min_tensors):
        rec = PathRecord(group, shape, layout, str(dtype).replace("torch.", ""), name, path, numel=x.numel(),
                         elsize=elsize, min_bytes=min_tensors * elsize, allowed=allowed_width(views, elsize))
        launch._launch = lambda kernel, grid, args, kwargs: rec.launches.append(
            Launch(kernel.__name__, tuple(grid), tuple(args), dict(kwargs)))
        fn()
        recs.append(rec)

    run("train_fwd", lambda: launch.train_forward(x, w, w, r, 1e-5, act, device=device),
        [x] + ([r] if res else []), 2 + res)
    run("infer", lambda: launch.infer_forward(x, stat, stat, w, w, r, 1e-5, act, device=device),
        [x] + ([r] if res else []), 2 + res)
    need_g = res and act != "identity"
    run("backward", lambda: launch.backward(x, x, w, w, r, stat, stat, stat, act, True, res, device=device),
        [x] + ([r] if need_g else []), 3 + 2 * need_g)
    return recs


def streamed_bytes(launch_rec: Launch, jit) -> int:
    """Bytes per element the launch streams: each activation-sized tensor it reads or writes."""
    table = jit.STREAMED.get(launch_rec.kernel, {})
    fn = getattr(jit, launch_rec.kernel)
    bound = dict(zip(fn.arg_names, launch_rec.args))
    bound.update(launch_rec.kwargs)
    total = 0
    for pname, (_access, flag) in table.items():
        if flag is None or bound.get(flag):
            total += bound[pname].element_size()
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three ResNet layers at batch 32 and the few-channel cases")
    ap.add_argument("--out", type=Path, help="folder for compiled.json and compiled.md")
    ap.add_argument("--only", help="regular expression: keep the cases whose 'shape layout dtype' matches it, "
                    "e.g. '(32, 64, 56, 56) nchw float32'")
    args = ap.parse_args(argv)
    if "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bn-compiled-")
        atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    import triton

    from batchnorm.kernels import _jit, launch

    device = launch.H100
    compiler = Compiler()
    launch._compiled_resources = lambda fn, a, kw: (lambda v: (v.regs, v.shared))(compiler.compile(fn, a, kw)[1])
    original_launch = launch._launch
    t0 = time.time()
    todo = [(g, s, lay, dt, ep) for g, s, lay in cases(args.quick) for dt in DTYPES for ep in EPILOGUES
            if not args.only or re.search(args.only, f"{s} {lay} {str(dt).replace('torch.', '')}")]
    records = []
    try:
        for i, (group, shape, layout, dtype, ep) in enumerate(todo):
            records += record_paths(shape, layout, dtype, ep, group, compiler, device)
            for rec in records[-3:]:
                for lr in rec.launches:
                    lr.key = compiler.compile(getattr(_jit, lr.kernel), lr.args, lr.kwargs)[0]
            if (i + 1) % 20 == 0 or i + 1 == len(todo):
                print(f"  [{i + 1}/{len(todo)}] cases, {len(compiler.results)} variants compiled, "
                      f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        launch._launch = original_launch

    # --- per launch checks, per path bytes --------------------------------------------------
    failures = []
    rows = collections.OrderedDict()
    path_rows = []
    for rec in records:
        bytes_ours = sum(streamed_bytes(lr, _jit) for lr in rec.launches)
        path_rows.append(rec)
        rec.bytes = bytes_ours
        for lr in rec.launches:
            v = compiler.results[lr.key]
            streaming = lr.kernel in _jit.STREAMED
            resident = v.resident(device)
            width = min(v.loads) if v.loads else None
            problems = []
            if v.spill:
                problems.append(f"spills {v.spill} B")
            if streaming and resident < MIN_RESIDENT:
                problems.append(f"{resident} program/SM")
            if streaming and (width is None or width < min(rec.allowed, 16)):
                problems.append(f"loads {width} B < {rec.allowed} B allowed")
            key = (rec.group, rec.layout, rec.dtype, lr.kernel, rec.shape[2:] if len(rec.shape) > 2 else ())
            row = rows.setdefault(key, dict(cases=set(), regs=[], spill=[], resident=[], loads=[], stores=[],
                                            allowed=[], problems=[], warps=set(), grid=[]))
            row["cases"].add(rec.shape)
            row["regs"].append(v.regs)
            row["spill"].append(v.spill)
            row["resident"].append(resident)
            row["loads"] += v.loads
            row["stores"] += v.stores
            row["allowed"].append(rec.allowed)
            row["warps"].add(v.num_warps)
            row["grid"].append(math.prod(lr.grid))
            if problems:
                row["problems"] += problems
                failures.append(f"{rec.path} {rec.shape} {rec.layout} {rec.dtype} {rec.epilogue}: {lr.kernel} "
                                f"({'; '.join(problems)})")

    def span(v, unit=""):
        v = sorted(set(v))
        return "-" if not v else f"{v[0]}{unit}" if len(v) == 1 else f"{v[0]}-{v[-1]}{unit}"

    header = ["group", "layout", "dtype", "H x W", "kernel", "registers", "spill B", "programs/SM", "warps",
              "load B", "store B", "allowed B", "check"]
    table = []
    for (group, layout, dtype, kernel, spatial), r in rows.items():
        table.append([group, layout, dtype, "x".join(map(str, spatial)) or "-", kernel, span(r["regs"]),
                      max(r["spill"]), span(r["resident"]), span(r["warps"]), span(r["loads"]),
                      span(r["stores"]), span(r["allowed"]), "FAIL" if r["problems"] else "ok"])
    # bytes per element per path and layout class
    by_path = collections.OrderedDict()
    for rec in path_rows:
        k = (rec.path, rec.layout, rec.dtype, rec.epilogue)
        by_path.setdefault(k, []).append((rec.bytes / rec.elsize, rec.min_bytes / rec.elsize, len(rec.launches)))
    bheader = ["path", "layout", "dtype", "epilogue", "tensor passes (ours)", "minimum", "ratio", "launches"]
    btable = [[p, lay, dt, ep, span([round(a) for a, _, _ in v]), span([round(b) for _, b, _ in v]),
               span([f"{a / b:.2f}" for a, b, _ in v]), span([n for _, _, n in v])]
              for (p, lay, dt, ep), v in by_path.items()]

    env = (f"triton {triton.__version__}, torch {torch.__version__}, target sm_90 ({device.name}, "
           f"{device.sm_count} SMs), {len(todo)} cases x 3 paths, {len(compiler.results)} compiled variants, "
           f"{time.time() - t0:.0f} s")
    md = [f"Compiled-code check: {env}", f"command: `python benchmarks/compiled.py{' --quick' if args.quick else ''}`",
          "", markdown_table(header, table), "",
          "Bytes streamed per element, in units of one activation tensor (reads + writes):", "",
          markdown_table(bheader, btable), ""]
    md.append(f"{len(failures)} failing launch(es)" + (":" if failures else "."))
    md += [f"- {f}" for f in failures[:50]]
    text = "\n".join(md)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compiled.md").write_text(text + "\n")
        (args.out / "compiled.json").write_text(json.dumps(dict(env=env, header=header, rows=table, bytes=btable,
                                                                failures=failures), indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
