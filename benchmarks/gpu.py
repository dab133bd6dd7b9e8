"""GPU benchmark of the fused Triton batch norm against eager PyTorch and torch.compile.

Run on a CUDA machine (one process, takes a while: every compiled baseline compiles once
per shape)::

    PYTHONPATH=src python3 benchmarks/gpu.py --out bench_out
    PYTHONPATH=src python3 benchmarks/gpu.py --out bench_out --quick   # fewer cases, no e2e

``--dry-run`` runs every code path on the CPU through the Triton interpreter with tiny
shapes (checks the script, measures nothing meaningful). What the first GPU run must do,
and the targets it checks: docs/kernels.md, "GPU performance: what the first GPU run must do".

Method
------
1. Copy bandwidth: ``dst.copy_(src)`` of a 1 GiB buffer, bytes = read + write. Every
   bandwidth figure below is reported as a fraction of it.
2. Per case, median times from ``triton.testing.do_bench`` (which clears the L2 cache
   before every call) of: training forward, backward, forward+backward, inference, for
   ``ours`` (the Triton kernels; the module path including the running-statistics update
   for the speed ratios, the raw custom op for the bandwidth fractions), ``eager``
   (``nn.BatchNorm2d`` + ``relu`` [+ add]) and ``compile`` (``torch.compile`` of that module;
   its backward time is forward+backward minus forward).
3. Byte models (``E`` = bytes of one activation tensor): training forward 2 reads + 1 write
   (+1 read for the residual); backward 4 reads + 1 write (+1 write for d residual);
   inference 1 read + 1 write (+1 read for the residual).
4. End to end: one bf16 channels_last ResNet-50 training step (model defined below,
   synthetic data, SGD) with ``torch.nn`` BN+ReLU(+add) and with ``BatchNormAct2d``, timed
   interleaved with CUDA events.

Outputs in ``--out``: ``results.csv``/``results.json`` (one row per measurement),
``summary.json`` (targets), ``table.md`` (the markdown table printed at the end), and
``bandwidth.png`` plotted from ``results.json`` when matplotlib is installed.
Uses no Triton API newer than 3.0 (``triton.testing.do_bench``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks.harness import markdown_table  # noqa: E402

# ResNet-50 batch-norm layers at batch 128 (torchvision v1.5 layout): (C, H, fused residual add, count)
RESNET50_BN = [
    (64, 112, False, 1), (64, 56, False, 6), (256, 56, True, 4), (128, 56, False, 1),
    (128, 28, False, 7), (512, 28, True, 5), (256, 28, False, 1), (256, 14, False, 11),
    (1024, 14, True, 7), (512, 14, False, 1), (512, 7, False, 5), (2048, 7, True, 4),
]

TARGETS = {
    "train_fwd_frac": 0.85, "bwd_frac": 0.80, "infer_frac": 0.90,
    "fwdbwd_vs_eager": 1.5, "fwdbwd_vs_compile": 1.0,
    "fewch_vs_eager": 5.0, "fewch_frac": 0.60, "small_latency_vs_eager": 1.1, "e2e_speedup": 1.05,
}


# --- timing ---------------------------------------------------------------------------------


def bench(fn, dry: bool) -> float:
    """Median milliseconds of ``fn``."""
    if dry:
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device, dry: bool) -> float:
    """Bytes/s of a device-to-device copy (read + write) of a 1 GiB buffer."""
    n = (1 << 28) if not dry else (1 << 16)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), dry)
    return 2 * src.numel() * 4 / (ms * 1e-3)


# --- cases ------------------------------------------------------------------------------------


def cases(args):
    """``(group, name, shape, residual)``; every group is run in each dtype and layout."""
    out = []
    if args.dry_run:
        return [("resnet50", "dry", (4, 8, 6, 6), True), ("fewch", "dry", (2, 2, 40, 40), False),
                ("small", "dry", (2, 4, 3, 3), False)]
    layers = RESNET50_BN if not args.quick else RESNET50_BN[::3]
    for c, h, add, count in layers:
        out.append(("resnet50", f"C{c}@{h}x{h} x{count}", (128, c, h, h), add))
    out.append(("large", "256MB", None, True))  # shape chosen per dtype: >= 256 MB
    out.append(("fewch", "(16,4,512,512)", (16, 4, 512, 512), False))
    out.append(("fewch", "(20,6,65536)", (20, 6, 65536), False))
    out.append(("small", "(8,64,14,14)", (8, 64, 14, 14), False))
    out.append(("small", "(32,256,7,7)", (32, 256, 7, 7), True))
    return out


def large_shape(dtype):
    elsize = torch.finfo(dtype).bits // 8
    n = (256 << 20) // (elsize * 256 * 64 * 64)
    return (n, 256, 64, 64)


class EagerBNAct(nn.Module):
    """The baseline: torch.nn batch norm, then the residual add, then ReLU."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, residual=None):
        y = self.bn(x) if x.dim() == 4 else F.batch_norm(
            x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, self.training, 0.1, 1e-5)
        return F.relu(y + residual if residual is not None else y)


def run_case(group, name, shape, res, dtype, layout, copy_bw, args, device):
    from batchnorm.kernels import launch
    from batchnorm.nn.fused import BatchNormAct2d

    dry = args.dry_run
    shape = shape or large_shape(dtype)
    c = shape[1]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=g) + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if res else None
    dy = torch.randn_like(x)
    E = x.numel() * x.element_size()
    rows = []

    def record(op, impl, ms, nbytes=None):
        row = dict(group=group, case=name, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
                   layout=layout, residual=bool(res), op=op, impl=impl, ms=round(ms, 5))
        if nbytes is not None:
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(gbps=round(gbps, 1), frac_copy=round(gbps * 1e9 / copy_bw, 3))
        rows.append(row)

    ours = BatchNormAct2d(c, backend="triton").to(device)
    eager = EagerBNAct(c).to(device)
    if x.dim() == 3:  # BatchNormAct2d checks for 4-D input; the (N, C, L) case goes through BatchNormAct1d
        from batchnorm.nn.fused import BatchNormAct1d

        ours = BatchNormAct1d(c, backend="triton").to(device)
    xg = x.detach().requires_grad_(True)
    rg = r.detach().requires_grad_(True) if res else None
    inputs = [xg] + ([rg] if res else [])
    w, b = ours.weight, ours.bias
    impls = {"ours": ours, "eager": eager}
    if not args.no_compile:
        torch._dynamo.reset()  # one compiled module per case: no recompile limit, no stale guards
        impls["compile"] = torch.compile(EagerBNAct(c).to(device), backend="inductor" if not dry else "eager")

    # raw kernels: bandwidth fractions
    with torch.no_grad():
        record("train_fwd", "ours_kernel", bench(lambda: launch.train_forward(x, w, b, r, 1e-5, "relu"), dry),
               (3 + res) * E)
        _, _, rstd, shift, dmean = launch.train_forward(x, w, b, r, 1e-5, "relu")
        record("bwd", "ours_kernel", bench(lambda: launch.backward(dy, x, w, b, r, shift, dmean, rstd, "relu", True,
                                                                 res), dry), (5 + res) * E)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        record("infer", "ours_kernel", bench(lambda: launch.infer_forward(x, rm, rv, w, b, r, 1e-5, "relu"), dry),
               (2 + res) * E)

    # modules: what a user runs (includes the running-statistics update)
    for impl, mod in impls.items():
        mod.train()

        def fwd(mod=mod):
            return mod(xg, rg) if res else mod(xg)

        def fwdbwd(mod=mod, fwd=fwd):
            return torch.autograd.grad(fwd(), inputs + list(mod.parameters()), dy)

        record("train_fwd", impl, bench(fwd, dry), (3 + res) * E)
        record("fwd_bwd", impl, bench(fwdbwd, dry), (8 + 2 * res) * E)
        if impl == "eager":
            y = fwd()
            eager_bwd = lambda y=y: torch.autograd.grad(y, inputs, dy, retain_graph=True)  # noqa: E731
            record("bwd", impl, bench(eager_bwd, dry), (5 + res) * E)
        mod.eval()
        with torch.no_grad():
            record("infer", impl, bench(fwd, dry), (2 + res) * E)
    t = {(rw["op"], rw["impl"]): rw["ms"] for rw in rows}
    for impl in impls:
        if (("bwd", impl)) not in t:
            record("bwd", impl, max(t[("fwd_bwd", impl)] - t[("train_fwd", impl)], 1e-9), (5 + res) * E)
    return rows


# --- ResNet-50 end to end -------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, norm_act):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = norm_act(width, "relu")
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm_act(width, "relu")
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = norm_act(cout, "relu")
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_act(cout, None))

    def forward(self, x):
        shortcut = x if self.down is None else self.down(x)
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.bn3(self.conv3(y), shortcut)


class TorchNormAct(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d, then add, then ReLU (separate kernels); same state_dict as BatchNormAct2d."""

    def __init__(self, c, act):
        super().__init__(c)
        self.act = act

    def forward(self, x, residual=None):
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.act == "relu" else y


def fused_norm_act(c, act):
    from batchnorm.nn.fused import BatchNormAct2d

    return BatchNormAct2d(c, activation=act, backend="triton")


def resnet50(norm_act, num_classes=1000, widths=(64, 128, 256, 512), depths=(3, 4, 6, 3)):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm_act(64, "relu"), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (w, d) in enumerate(zip(widths, depths)):
        for j in range(d):
            layers.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1, norm_act))
            cin = w * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def end_to_end(args, device):
    dry = args.dry_run
    batch, size = (128, 224) if not dry else (2, 32)
    dtype = torch.bfloat16
    fmt = torch.channels_last
    torch.manual_seed(0)
    # the dry run checks the code path on a ResNet-50-shaped toy (one block per stage, 8 channels)
    shape_kw = {} if not dry else dict(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1))
    models = {"torch.nn": resnet50(TorchNormAct, **shape_kw), "fused": resnet50(fused_norm_act, **shape_kw)}
    models["fused"].load_state_dict(models["torch.nn"].state_dict())
    steps = {}
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,), device=device)
    for name, m in models.items():
        m.to(device=device, dtype=dtype, memory_format=fmt).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), target).backward()
            opt.step()

        steps[name] = step
    n_iter, n_rounds = (20, 5) if not dry else (1, 1)
    times = {k: [] for k in steps}
    for fn in steps.values():
        for _ in range(3 if not dry else 1):
            fn()
    for _ in range(n_rounds):  # interleaved rounds: a slow phase hits both
        for name, fn in steps.items():
            if dry:
                t0 = time.perf_counter()
                for _ in range(n_iter):
                    fn()
                times[name].append(1e3 * (time.perf_counter() - t0) / n_iter)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n_iter):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / n_iter)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [dict(group="e2e", case=f"resnet50 bf16 channels_last batch {batch}", shape=f"{batch}x3x{size}x{size}",
                 dtype="bfloat16", layout="channels_last", residual=True, op="train_step", impl=k, ms=round(v, 4))
            for k, v in med.items()]


# --- summary ---------------------------------------------------------------------------------


def geomean(v):
    v = [a for a in v if a > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def summarize(rows):
    """Per-case table rows and the targets, PASS/MISS, from the measurements."""
    by = {}
    for r in rows:
        by.setdefault((r["group"], r["case"], r["dtype"], r["layout"]), {})[(r["op"], r["impl"])] = r
    table, checks = [], {k: [] for k in TARGETS}
    for (group, case, dtype, layout), m in by.items():
        if group == "e2e":
            continue

        def ms(op, impl, m=m):
            return m[(op, impl)]["ms"] if (op, impl) in m else float("nan")

        def frac(op, m=m):
            return m[(op, "ours_kernel")]["frac_copy"]

        vs_eager = ms("fwd_bwd", "eager") / ms("fwd_bwd", "ours")
        vs_comp = ms("fwd_bwd", "compile") / ms("fwd_bwd", "ours")
        table.append([group, case, dtype, layout, f"{ms('train_fwd', 'ours'):.3f}",
                      f"{ms('train_fwd', 'eager'):.3f}", f"{ms('fwd_bwd', 'ours'):.3f}",
                      f"{ms('fwd_bwd', 'eager'):.3f}", f"{ms('fwd_bwd', 'compile'):.3f}",
                      f"{vs_eager:.2f}x", f"{vs_comp:.2f}x", f"{frac('train_fwd'):.0%}", f"{frac('bwd'):.0%}",
                      f"{frac('infer'):.0%}"])
        if group in ("large", "resnet50"):
            checks["train_fwd_frac"].append(frac("train_fwd"))
            checks["bwd_frac"].append(frac("bwd"))
            checks["infer_frac"].append(frac("infer"))
        if group != "small":
            checks["fwdbwd_vs_eager"].append(vs_eager)
            checks["fwdbwd_vs_compile"].append(vs_comp)
        if group == "fewch":
            checks["fewch_vs_eager"].append(vs_eager)
            checks["fewch_frac"].append(min(frac("train_fwd"), frac("bwd")))
        if group == "small":
            checks["small_latency_vs_eager"].append(ms("fwd_bwd", "ours") / ms("fwd_bwd", "eager"))
    e2e = {r["impl"]: r["ms"] for r in rows if r["group"] == "e2e"}
    if e2e:
        checks["e2e_speedup"].append(e2e["torch.nn"] / e2e["fused"])
    summary = {}
    for k, v in checks.items():
        if not v:
            continue
        if k in ("fwdbwd_vs_eager", "fwdbwd_vs_compile"):
            value, how = geomean(v), "geomean"
        elif k == "small_latency_vs_eager":
            value, how = max(v), "worst"
        elif k == "e2e_speedup":
            value, how = v[0], "ratio"
        else:
            value, how = min(v), "worst"
        ok = value <= TARGETS[k] if k == "small_latency_vs_eager" else value >= TARGETS[k]
        summary[k] = dict(value=round(value, 3), how=how, target=TARGETS[k], status="PASS" if ok else "MISS")
    header = ["group", "case", "dtype", "layout", "fwd ours ms", "fwd eager ms", "f+b ours ms", "f+b eager ms",
              "f+b compile ms", "f+b vs eager", "f+b vs compile", "fwd %copy", "bwd %copy", "infer %copy"]
    return header, table, summary


def plot(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = json.loads((out / "results.json").read_text())["rows"]
    kern = [r for r in rows if r["impl"] == "ours_kernel"]
    labels = sorted({f"{r['case']} {r['dtype']} {r['layout'][:2]}" for r in kern})
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(labels) + 1.5))
    for i, op in enumerate(("train_fwd", "bwd", "infer")):
        vals = {f"{r['case']} {r['dtype']} {r['layout'][:2]}": r["frac_copy"] for r in kern if r["op"] == op}
        ax.barh([j + 0.27 * i for j in range(len(labels))], [vals.get(lb, 0) for lb in labels], height=0.27, label=op)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("fraction of copy bandwidth (byte model in benchmarks/gpu.py)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bandwidth.png", dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for results.csv/json, summary.json, table.md")
    ap.add_argument("--quick", action="store_true", help="every third ResNet layer, no end-to-end step")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--no-e2e", action="store_true", help="skip the ResNet-50 training step")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layouts", default="contiguous,channels_last")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes: checks the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --dry-run to check the script on the CPU)")
    else:
        device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run: not a measurement)",
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               command=" ".join([Path(sys.executable).name] + sys.argv))
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']}\n# {env['command']}", flush=True)
    copy_bw = copy_bandwidth(device, args.dry_run)
    env["copy_GBps"] = round(copy_bw / 1e9, 1)
    print(f"copy bandwidth (read + write, 1 GiB): {copy_bw / 1e9:.1f} GB/s", flush=True)

    rows = []
    for group, name, shape, res in cases(args):
        for dt in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                if layout == "channels_last" and shape is not None and len(shape) != 4:
                    continue
                rows += run_case(group, name, shape, res, getattr(torch, dt), layout, copy_bw, args, device)
                print(f"  done {group} {name} {dt} {layout}", flush=True)
    if not (args.quick or args.no_e2e):
        rows += end_to_end(args, device)
    header, table, summary = summarize(rows)
    (args.out / "results.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    (args.out / "summary.json").write_text(json.dumps(dict(env=env, targets=summary), indent=1))
    with open(args.out / "results.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    md = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}; copy bandwidth {env['copy_GBps']} GB/s",
          f"command: `{env['command']}`", "", markdown_table(header, table), ""]
    md.append(markdown_table(["target", "value", "how", "goal", "status"],
                             [[k, v["value"], v["how"], ("<= " if k.startswith("small") else ">= ") + str(v["target"]),
                               v["status"]]
                              for k, v in summary.items()]))
    e2e = [r for r in rows if r["group"] == "e2e"]
    if e2e:
        md += ["", markdown_table(["end to end", "impl", "ms/step"], [[r["case"], r["impl"], r["ms"]] for r in e2e])]
    (args.out / "table.md").write_text("\n".join(md) + "\n")
    plot(args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
