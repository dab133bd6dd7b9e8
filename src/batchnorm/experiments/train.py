"""The one training loop every experiment uses, with seeded data order.

Reproducibility: the caller seeds the model's initialisation (``torch.manual_seed``);
the data order comes from its own ``torch.Generator`` seeded with ``seed``, so two
runs with the same seed see the same batches in the same order and produce the same
numbers on the same machine. Batches are drawn epoch by epoch from a fresh
permutation, dropping the last incomplete batch (batch statistics of a partial batch
would differ in size between arms).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data import Dataset

__all__ = ["batch_indices", "batch_statistics", "eval_steps", "evaluate", "loss_and_accuracy", "param_groups", "progress",
           "running_statistics", "steps_to_reach", "train"]


def progress(total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr, hidden with ``quiet`` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet or not sys.stderr.isatty(), leave=False, unit="run")


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless stream of index batches: a seeded permutation per epoch, last partial batch dropped."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the training-set size), got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def eval_steps(steps: int, every: int, dense_until: int = 0, dense_every: int = 0) -> list[int]:
    """Evaluation points: 0, every ``every`` steps and the last step; every ``dense_every`` up to ``dense_until``.

    Example::

        >>> eval_steps(100, 50, dense_until=20, dense_every=10)
        [0, 10, 20, 50, 100]
    """
    pts = set(range(0, steps + 1, every)) | {steps}
    if dense_until and dense_every:
        pts |= set(range(0, min(dense_until, steps) + 1, dense_every))
    return sorted(pts)


@contextmanager
def batch_statistics(model: nn.Module):
    """``model`` in train mode (normalization over the batch) with every buffer restored on exit.

    Running statistics and step counters are saved before and copied back after, so a
    forward pass inside changes nothing; gradients are off. The mode is restored too.
    Example::

        >>> with batch_statistics(net) as m:
        ...     out = m(x)          # batch statistics of x; net's running stats unchanged
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            yield model
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        model.train(was_training)


@contextmanager
def running_statistics(model: nn.Module):
    """``model`` in eval mode (normalization with the running statistics), its mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, train_mode: bool = False,
                      batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``.

    ``train_mode=False``: eval mode (running statistics). ``train_mode=True``: batch
    statistics over consecutive batches of ``batch_size`` (a trailing partial batch is
    dropped), inside :func:`batch_statistics`, so the running statistics are not
    touched. The model's mode is restored.
    """
    n = len(y) - len(y) % batch_size if train_mode and len(y) >= batch_size else len(y)
    correct, loss = 0, 0.0
    with batch_statistics(model) if train_mode else running_statistics(model) as net:
        for i in range(0, n, batch_size):
            out = net(x[i:i + batch_size])
            loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return loss / max(n, 1), correct / max(n, 1)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, train_mode: bool = False, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on ``(x, y)`` (see :func:`loss_and_accuracy`)."""
    return loss_and_accuracy(model, x, y, train_mode=train_mode, batch_size=batch_size)[1]


def param_groups(model: nn.Module, lr: float, scaled: dict | None = None):
    """SGD parameter groups: ``scaled`` maps parameters to their own learning rate."""
    scaled = scaled or {}
    ids = {id(p) for p in scaled}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr}]
    groups += [{"params": [p], "lr": r} for p, r in scaled.items()]
    return groups


def train(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    evals: Sequence[int],
    momentum: float = 0.0,
    on_eval: Callable[[nn.Module, int], dict] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step_fn: Callable | None = None,
    measure: bool = True,
) -> dict:
    """Train ``model`` with SGD and cross-entropy for ``steps`` steps; return its history.

    At every step in ``evals`` (0 and ``steps`` are always included) the validation and
    test accuracy in eval mode are recorded, plus whatever ``on_eval(model, step)``
    returns. Training stops when the loss becomes NaN/Inf (``history["diverged"] =
    True``, ``history["diverged_at"]`` the step); the remaining evaluation points are
    then not recorded. ``step_fn(model, x, y) -> loss`` replaces the default
    forward/backward (the distributed runs use it); it must call ``backward``.
    ``measure=False`` records steps and losses only (the distributed runs' other ranks).

    Returns ``{"step": [...], "val_acc": [...], "test_acc": [...], "train_loss": [...]
    (mean over each interval), "diverged": bool, "diverged_at": int | None,
    <on_eval keys>: [...]}``.
    """
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    hist: dict = {"step": [], "val_acc": [], "test_acc": [], "train_loss": [], "diverged": False,
                  "diverged_at": None}
    points = set(evals) | {0, steps}
    batches = batch_indices(len(data.train_y), batch_size, seed)

    def record(step: int, loss_sum: float, count: int) -> None:
        hist["step"].append(step)
        hist["train_loss"].append(loss_sum / count if count else float("nan"))
        if not measure:
            return
        hist["val_acc"].append(evaluate(model, data.val_x, data.val_y))
        hist["test_acc"].append(evaluate(model, data.test_x, data.test_y))
        if on_eval is not None:
            for key, value in on_eval(model, step).items():
                hist.setdefault(key, []).append(value)
        model.train()

    model.train()
    record(0, 0.0, 0)
    loss_sum, count = 0.0, 0
    for step in range(1, steps + 1):
        idx = next(batches)
        opt.zero_grad(set_to_none=True)
        if step_fn is None:
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
        else:
            loss = step_fn(model, data.train_x[idx], data.train_y[idx])
        value = float(loss.detach())
        if not math.isfinite(value):
            hist["diverged"], hist["diverged_at"] = True, step
            break
        opt.step()
        loss_sum, count = loss_sum + value, count + 1
        if step in points:
            record(step, loss_sum, count)
            loss_sum, count = 0.0, 0
    model.eval()
    return hist


def steps_to_reach(steps, accs, threshold: float) -> int | None:
    """First recorded step whose accuracy is ``>= threshold``, or ``None`` if never."""
    for s, a in zip(steps, accs):
        if a >= threshold:
            return int(s)
    return None
