"""CPU speed of the normalization family against torch.nn, side by side in one run.

    python benchmarks/family.py [--repeats 10] [--sync-steps 5] [--out results/bench_family.json]

Forward+backward (training) on (64, 64, 56, 56), float32, contiguous:

* BatchRenorm2d and GhostBatchNorm2d(virtual_batch_size=32) vs torch.nn.BatchNorm2d
  (targets: <= 1.25x and <= 1.5x);
* GroupNorm(32, 64) vs torch.nn.GroupNorm(32, 64) (target <= 1.10x);
* FrozenBatchNorm2d vs torch.nn.BatchNorm2d in eval mode, input and (for torch) affine
  parameters requiring grad, as in a fine-tuned backbone (target <= 0.6x);

and SyncBatchNorm: time per forward+backward step with 2 gloo processes on 127.0.0.1
(1 thread each, half the batch each) vs single-process batchnorm.BatchNorm2d on the whole
batch (all threads). Ratios are of medians measured interleaved (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine_line, markdown_table, time_side_by_side  # noqa: E402

SHAPE = (64, 64, 56, 56)


def bench_layers(repeats: int):
    from batchnorm.nn.frozen import FrozenBatchNorm2d
    from batchnorm.nn.ghost import GhostBatchNorm2d
    from batchnorm.nn.groupnorm import GroupNorm
    from batchnorm.nn.renorm import BatchRenorm2d

    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    dy = torch.randn(SHAPE)
    xg = x.clone().requires_grad_(True)
    c = SHAPE[1]
    torch_bn_eval = torch.nn.BatchNorm2d(c).eval()
    frozen = FrozenBatchNorm2d(c)
    frozen.load_state_dict(torch_bn_eval.state_dict())
    mods = {
        "torch BatchNorm2d (train)": torch.nn.BatchNorm2d(c),
        "BatchRenorm2d": BatchRenorm2d(c),
        "GhostBatchNorm2d(vb=32)": GhostBatchNorm2d(c, virtual_batch_size=32),
        "torch GroupNorm(32)": torch.nn.GroupNorm(32, c),
        "GroupNorm(32)": GroupNorm(32, c),
        "torch BatchNorm2d (eval)": torch_bn_eval,
        "FrozenBatchNorm2d": frozen,
    }

    def fwd_bwd(m):
        def run():
            xg.grad = None
            m(xg).backward(dy)

        return run

    pairs = [
        ("BatchRenorm2d", "torch BatchNorm2d (train)", 1.25),
        ("GhostBatchNorm2d(vb=32)", "torch BatchNorm2d (train)", 1.5),
        ("GroupNorm(32)", "torch GroupNorm(32)", 1.10),
        ("FrozenBatchNorm2d", "torch BatchNorm2d (eval)", 0.6),
    ]
    # each pair is timed on its own, interleaved: a third module in the rotation would put
    # its allocations between them and bias whichever comes next
    times, rows = {}, []
    for ours, base, target in pairs:
        pair = time_side_by_side({k: fwd_bwd(mods[k]) for k in (base, ours)}, repeats=repeats, warmup=2)
        times[f"{ours} vs {base}"] = pair
        rows.append((ours, f"{pair[ours] * 1e3:.1f}", base, f"{pair[base] * 1e3:.1f}",
                     f"{pair[ours] / pair[base]:.2f}", f"<= {target}"))  # fmt: skip
    return times, rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, world, port, steps, queue):
    import torch.distributed as dist

    from batchnorm.distributed import SyncBatchNorm

    torch.set_num_threads(max(torch.get_num_threads() // world, 1))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    local = (SHAPE[0] // world,) + SHAPE[1:]
    torch.manual_seed(rank)
    x = torch.randn(local, requires_grad=True)
    dy = torch.randn(local)
    bn = SyncBatchNorm(SHAPE[1])
    samples = []
    for step in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        x.grad = None
        bn(x).backward(dy)
        dist.barrier()
        if step >= 2:
            samples.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(statistics.median(samples))
    dist.destroy_process_group()


def bench_sync(steps: int):
    import torch.multiprocessing as mp

    from batchnorm.nn.batchnorm import BatchNorm2d

    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, world, port, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        sync_t = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    torch.manual_seed(0)
    x = torch.randn(SHAPE, requires_grad=True)
    dy = torch.randn(SHAPE)
    bn = BatchNorm2d(SHAPE[1])

    def step():
        x.grad = None
        bn(x).backward(dy)

    single_t = time_side_by_side({"single": step}, repeats=steps, warmup=2)["single"]
    return sync_t, single_t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sync-steps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)

    print(machine_line())
    print(f"forward+backward on {SHAPE} float32, median of {args.repeats} interleaved runs")
    times, rows = bench_layers(args.repeats)
    print(markdown_table(["layer", "ms", "baseline", "ms", "ratio", "target"], rows))
    sync_t, single_t = bench_sync(args.sync_steps)
    print()
    print(markdown_table(
        ["SyncBatchNorm, 2 gloo processes (32 samples each)", "ms/step", "single-process BatchNorm2d (64 samples)",
         "ms/step", "ratio"],
        [("forward+backward", f"{sync_t * 1e3:.1f}", "forward+backward", f"{single_t * 1e3:.1f}",
          f"{sync_t / single_t:.2f}")],
    ))  # fmt: skip
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": machine_line(), "shape": SHAPE, "times_s": times, "sync_step_s": sync_t,
                       "single_step_s": single_t}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
