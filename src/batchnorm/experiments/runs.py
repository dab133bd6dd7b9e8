"""The run functions the experiments execute (see :mod:`.sweep`): one training run from a JSON spec.

A spec is a plain dict, so it can be hashed for the run cache and shown in reports::

    {"model": {"kind": "mlp", "hidden": [100, 100, 100], "norm": "bn", "activation": "sigmoid",
               "init": "glorot"},
     "lr": 0.5, "momentum": 0.0, "batch_size": 60, "steps": 3000, "evals": [0, 50, ...],
     "probes": ["sigmoid_input"], "final": ["saturation"]}

Optional keys: ``"scale_hidden": k`` (multiply the MLP's hidden weight matrices by ``k``
after initialisation) with ``"hidden_lr_power": p`` (their learning rate times ``k**p``);
``"world": W`` for :func:`ddp_run` (``batch_size`` is then per process).

:func:`train_run` seeds the initialisation with ``seed`` and the batch order with
``seed`` (a separate generator), trains with :func:`.train.train`, and returns the
history plus the requested probes: per evaluation point (``"probes"``) or once at the
end (``"final"``). :data:`PROBES` lists them.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset
from .models import MLP, ConvNet, scale_weights
from .train import batch_statistics, loss_and_accuracy, param_groups, train

__all__ = ["PROBES", "build_model", "ddp_run", "train_run"]

PERCENTILES = (15, 50, 85)


def build_model(m: dict, data: Dataset) -> nn.Module:
    """The network a spec's ``"model"`` entry describes (``kind`` ``"mlp"`` or ``"conv"``; the rest are kwargs)."""
    kw = {k: v for k, v in m.items() if k != "kind"}
    if isinstance(kw.get("init"), list):
        kw["init"] = tuple(kw["init"])
    if m["kind"] == "mlp":
        return MLP(data.num_inputs, kw.pop("hidden"), data.num_classes, **kw)
    if m["kind"] == "conv":
        return ConvNet(data.image_shape, data.num_classes, **kw)
    raise ValueError(f"unknown model kind {m['kind']!r}")


# ----------------------------------------------------------------------------- probes


def _probe_set(data: Dataset, n: int = 600):
    return data.val_x[:n], data.val_y[:n]


@torch.no_grad()
def probe_sigmoid_input(model, data, spec) -> dict:
    """Inputs to the last hidden layer's nonlinearities on (up to) 600 validation images, with batch statistics.

    Figure 1(b, c) of the paper: the 15th/50th/85th percentiles over the images of the
    input to one sigmoid (unit 0), plus the median and the 15-85 band width of *every*
    unit of that layer (for a drift measure that does not hinge on one unit). Computed in
    train mode - the distribution the sigmoid sees while training - inside
    :func:`.train.batch_statistics`, so running statistics are untouched.
    """
    x, _ = _probe_set(data)
    with batch_statistics(model) as net:
        _, pre = net(x, return_preacts=True)
    z = pre[-1].double().numpy()
    q = np.percentile(z, PERCENTILES, axis=0)  # (3, units)
    out = {f"p{p}": float(q[i, 0]) for i, p in enumerate(PERCENTILES)}
    out["unit_median"] = q[1].tolist()
    out["unit_band"] = (q[2] - q[0]).tolist()
    return out


@torch.no_grad()
def probe_saturation(model, data, spec) -> dict:
    """Fraction of (image, hidden unit) pairs whose nonlinearity passes (almost) no gradient, eval mode.

    Sigmoid: ``sigma'(z) < 0.01`` (``|z| > 4.6``); ReLU: ``z <= 0``. Also the fraction of
    ReLU units that are zero for every probe image ("dead"). NaN weights give NaN.
    """
    x, _ = _probe_set(data)
    model.eval()
    _, pre = model(x, return_preacts=True)
    act = spec["model"].get("activation", "sigmoid")
    z = torch.cat([p.double() for p in pre], dim=1)
    if not torch.isfinite(z).all():
        return {"saturated_frac": float("nan"), "dead_frac": float("nan")}
    if act == "sigmoid":
        s = torch.sigmoid(z)
        sat = (s * (1 - s) < 0.01).double().mean()
        dead = ((s * (1 - s) < 0.01).all(dim=0)).double().mean()
    else:
        sat = (z <= 0).double().mean()
        dead = ((z <= 0).all(dim=0)).double().mean()
    return {"saturated_frac": float(sat), "dead_frac": float(dead)}


def probe_grad_norms(model, data, spec, batches: int = 5) -> dict:
    """Mean over ``batches`` fixed training batches of ``||dL/dW_l||_F`` for every hidden layer (train mode).

    Runs on a copy, so parameters, running statistics and ``.grad`` of ``model`` are untouched.
    """
    net = copy.deepcopy(model).train()
    bs = spec["batch_size"]
    total = np.zeros(len(net.linears))
    for b in range(batches):
        sl = slice(b * bs, (b + 1) * bs)
        loss = F.cross_entropy(net(data.train_x[sl]), data.train_y[sl])
        grads = torch.autograd.grad(loss, [lin.weight for lin in net.linears])
        total += np.array([float(torch.linalg.norm(g)) for g in grads])
    return {"grad_norms": (total / batches).tolist()}


def probe_batch_stats(model, data, spec) -> dict:
    """Test accuracy with batch statistics (running statistics untouched), test batches of the training batch size."""
    bs = min(spec["batch_size"], len(data.test_y))
    return {"batch_stats_acc": loss_and_accuracy(model, data.test_x, data.test_y, train_mode=True, batch_size=bs)[1]}


def probe_fit(model, data, spec) -> dict:
    """Loss and accuracy in eval mode on the whole training split and on the test split (the generalisation gap)."""
    tl, ta = loss_and_accuracy(model, data.train_x, data.train_y)
    el, ea = loss_and_accuracy(model, data.test_x, data.test_y)
    return {"train_loss_full": tl, "train_acc_full": ta, "test_loss": el}


def probe_recalibrate(model, data, spec) -> dict:
    """Eval-mode test accuracy after :func:`batchnorm.recalibrate` over the training split (batches of the training size)."""
    import batchnorm

    bs = spec["batch_size"]
    batches = [data.train_x[i:i + bs] for i in range(0, len(data.train_y) - bs + 1, bs)]
    net = copy.deepcopy(model)
    batchnorm.recalibrate(net, batches, num_batches=len(batches), quiet=True)
    return {"recalibrated_acc": loss_and_accuracy(net, data.test_x, data.test_y)[1]}


#: probe name -> function(model, data, spec) -> dict of numbers/lists
PROBES = {"sigmoid_input": probe_sigmoid_input, "saturation": probe_saturation, "grad_norms": probe_grad_norms,
          "batch_stats": probe_batch_stats, "fit": probe_fit, "recalibrate": probe_recalibrate}


def _finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _final_probes(model, data, spec, hist) -> None:
    for name in spec.get("final", []):
        if hist["diverged"] or not _finite(model):
            continue
        hist.update(PROBES[name](model, data, spec))


def _optimizer(model, spec):
    k, power = spec.get("scale_hidden"), spec.get("hidden_lr_power")
    scaled = {lin.weight: spec["lr"] * k ** power for lin in model.linears} if k and power else None
    return torch.optim.SGD(param_groups(model, spec["lr"], scaled), lr=spec["lr"],
                           momentum=spec.get("momentum", 0.0))


def train_run(spec: dict, seed: int, data: Dataset) -> dict:
    """One training run of ``spec`` with ``seed``; returns the history and the probes (see the module docstring)."""
    torch.manual_seed(seed)
    model = build_model(spec["model"], data)
    if spec.get("scale_hidden"):
        scale_weights(model, spec["scale_hidden"])
    probes = [PROBES[p] for p in spec.get("probes", [])]

    def on_eval(m, step):
        out = {}
        for p in probes:
            out.update(p(m, data, spec))
        return out

    hist = train(model, data, steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"], seed=seed,
                 evals=spec["evals"], optimizer=_optimizer(model, spec), on_eval=on_eval if probes else None)
    _final_probes(model, data, spec, hist)
    return hist


# ----------------------------------------------------------------------------- distributed


def _ddp_rank(rank: int, world: int, init_file: str, out_file: str, spec: dict, seed: int, data: Dataset) -> None:
    import torch.distributed as dist

    import batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec.get("timeout_s", 300)))
    try:
        local = spec["batch_size"]
        torch.manual_seed(seed)  # the same initial weights on every rank
        model = build_model(spec["model"], data)
        if spec.get("sync"):
            model = batchnorm.convert_sync_batchnorm(model)
        params = list(model.parameters())

        def step_fn(m, x, y):
            part = slice(rank * local, (rank + 1) * local)
            loss = F.cross_entropy(m(x[part]), y[part])
            loss.backward()
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
            dist.all_reduce(flat)  # one collective: gradients and loss summed over ranks
            flat /= world
            i = 0
            for p in params:
                p.grad.copy_(flat[i:i + p.numel()].view_as(p))
                i += p.numel()
            return flat[-1]  # the global mean loss: every rank sees the same value (and the same NaN)

        hist = train(model, data, steps=spec["steps"], batch_size=local * world, lr=spec["lr"], seed=seed,
                     evals=spec["evals"], optimizer=_optimizer(model, spec), step_fn=step_fn, measure=rank == 0)
        if rank == 0:
            _final_probes(model, data, spec, hist)
            Path(out_file).write_text(json.dumps(hist, allow_nan=True))
    finally:
        dist.destroy_process_group()


def ddp_run(spec: dict, seed: int, data: Dataset) -> dict:
    """Data-parallel training on ``spec["world"]`` gloo processes on this machine, ``batch_size`` samples each.

    Every rank starts from the same weights (same seed) and takes its slice of the
    same global batch (``world * batch_size`` samples drawn like a single-process run
    with that batch size); gradients are averaged over ranks after each backward (what
    ``DistributedDataParallel`` does). ``spec["sync"]``: the BN layers become
    :class:`batchnorm.SyncBatchNorm` (statistics over the global batch); otherwise each
    rank normalizes over its own samples. Rank 0 evaluates (its running statistics) and
    returns the history. Example::

        >>> ddp_run({**spec, "world": 4, "batch_size": 2, "sync": True}, 0, data)
    """
    world = int(spec["world"])
    tmp = tempfile.mkdtemp(prefix="bn-ddp-")
    try:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "rank0.json")
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_ddp_rank, args=(r, world, init_file, out_file, spec, seed, data))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        codes = [p.exitcode for p in procs]
        if any(codes) or not os.path.exists(out_file):
            raise RuntimeError(f"distributed run failed: exit codes {codes} (spec {spec}, seed {seed})")
        return json.loads(Path(out_file).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
