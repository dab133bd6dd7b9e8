"""One rank of the SyncBatchNorm tests (run as a script by test_sync.py; not a test module).

``python sync_worker.py RANK WORLD PORT OUT_DIR MODE`` with MODE ``run`` (all scenarios of
:data:`SCENARIOS` for WORLD), ``die-before-init`` or ``die-after-init`` (rank 1 misbehaves,
the others must fail with a clear error). Writes ``OUT_DIR/rank{RANK}.pt`` (results) or
``OUT_DIR/rank{RANK}.err`` (the error message) and exits 0 / 3.
"""

import os
import sys
import traceback
from datetime import timedelta

import torch

C = 3
SHAPE_REST = (2, 3)  # (H, W): small, odd
#: per world size: (name, batch size of each member of the group, group ranks or None for all)
SCENARIOS = {
    2: [("even", (4, 4), None), ("uneven", (1, 6), None), ("mean 1e6", (3, 5), None)],
    3: [("uneven+empty", (2, 5, 0), None), ("one-sample+empty", (1, 0, 2), None), ("subgroup", (3, 2), (0, 2))],
}
TIMEOUT_S = 8


def scenario_data(name, sizes, step):
    """Full-batch input and output gradient of one scenario step (identical on every rank)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 10 + step)
    n = sum(sizes)
    x = torch.randn((n, C) + SHAPE_REST, generator=g) * 2 + torch.tensor([5.0, -3.0, 0.5]).view(1, C, 1, 1)
    dy = torch.randn((n, C) + SHAPE_REST, generator=g)
    if "1e6" in name:  # far off-centre: the global statistics must be re-centred to stay exact in float32
        x = (x.double() + 1e6).float()
    return x, dy


def initial_state():
    g = torch.Generator().manual_seed(0)
    return {
        "weight": torch.rand(C, generator=g) + 0.5,
        "bias": torch.randn(C, generator=g),
        "running_mean": torch.randn(C, generator=g),
        "running_var": torch.rand(C, generator=g) + 0.5,
        "num_batches_tracked": torch.tensor(3),
    }


def local_slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def run_scenarios(rank, world):
    import torch.distributed as dist

    from batchnorm.distributed import SyncBatchNorm

    results = {}
    for name, sizes, members in SCENARIOS[world]:
        group = dist.new_group(list(members)) if members is not None else None  # collective: all ranks call it
        if members is not None and rank not in members:
            continue
        idx = members.index(rank) if members is not None else rank
        bn = SyncBatchNorm(C, momentum=0.2, process_group=group)
        bn.load_state_dict(initial_state())
        out = {"y": [], "dx": [], "dw": [], "db": []}
        for step in range(2):  # two steps: the running statistics compound
            x, dy = scenario_data(name, sizes, step)
            xl = local_slice(x, sizes, idx).clone().requires_grad_(True)
            bn.zero_grad()
            y = bn(xl)
            y.backward(local_slice(dy, sizes, idx))
            out["y"].append(y.detach())
            out["dx"].append(xl.grad)
            out["dw"].append(bn.weight.grad.clone())
            out["db"].append(bn.bias.grad.clone())
        out["state"] = {k: v.clone() for k, v in bn.state_dict().items()}
        bn.eval()
        out["y_eval"] = bn(local_slice(scenario_data(name, sizes, 0)[0], sizes, idx)).detach()
        results[name] = out
    return results


#: seconds each rank waits for the others in the fault scenarios (the layer's own timeout)
FAULT_TIMEOUT_S = 4


def run_fault(rank, world, kind, out_dir):
    """Rank ``world - 1`` misbehaves in the way ``kind`` names; every rank that reaches the layer must
    raise a clear error with its parameters and buffers bit-identical (checked here, reported in .err)."""
    import time

    from batchnorm.distributed import SyncBatchNorm

    bad = rank == world - 1
    channels = C + 1 if (bad and kind == "channels") else C
    bn = SyncBatchNorm(channels, check_finite=(kind == "nan"), timeout=FAULT_TIMEOUT_S)
    if bad and kind == "dtype":
        bn = bn.double()
    x = torch.randn(2, channels, 3, dtype=torch.float64 if (bad and kind == "dtype") else torch.float32)
    if bad and kind == "input":
        x = torch.randn(2, C + 2, 3)  # wrong channel count for the layer: rejected locally, told to the others
    if bad and kind == "nan":
        x[0, 1, 0] = float("nan")
    if bad and kind == "raises":
        time.sleep(3 * FAULT_TIMEOUT_S)  # raised elsewhere and stays alive: never reaches the layer
        raise RuntimeError("rank failed before the layer")
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    try:
        bn(x.requires_grad_(True)).sum().backward()
    except Exception:
        same = all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
        with open(os.path.join(out_dir, f"rank{rank}.state"), "w") as f:
            f.write("unchanged" if same else "CHANGED")
        raise


def main():
    rank, world, port, out_dir, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch.distributed as dist

        if mode == "die-before-init" and rank == 1:
            os._exit(7)  # never joins
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S))  # fmt: skip
        if mode == "die-after-init":
            if rank == 1:
                os._exit(7)  # joins, then dies before the layer's collective
            from batchnorm.distributed import SyncBatchNorm

            SyncBatchNorm(C).train()(torch.randn(2, C, 2, 2))
            raise AssertionError("the forward returned although a peer is dead")
        if mode.startswith("fault-"):
            run_fault(rank, world, mode[len("fault-"):], out_dir)
            raise AssertionError("the fault did not raise")
        results = run_scenarios(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except Exception as e:  # report the error for the parent test to check
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        sys.stdout.flush()
        os._exit(3)
    os._exit(0)


if __name__ == "__main__":
    main()
