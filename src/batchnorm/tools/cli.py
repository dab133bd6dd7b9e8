"""``batchnorm fold | doctor | recalibrate``: the model tools on the command line.

Every command takes the model as ``package.module:factory`` - an importable callable that
returns the ``nn.Module`` (called without arguments) - and optionally ``--state-dict FILE``,
read with ``torch.load(FILE, weights_only=True)`` (tensors and containers only; arbitrary
pickled objects are refused). A file that is missing, truncated, not a state_dict, or
does not match the model ends the command with a one-line ``error:`` on stderr and exit
status 2, before anything is written. Outputs are written atomically: to a temporary file
in the destination's directory, then ``os.replace``-d over the destination, so a reader
never sees a half-written file and a failed command leaves an existing file untouched.

Examples::

    batchnorm doctor mypkg.models:resnet18 --state-dict ckpt.pt --input-shape 8,3,224,224
    batchnorm fold mypkg.models:resnet18 --state-dict ckpt.pt --output folded.pt --json fold.json
    batchnorm recalibrate mypkg.models:resnet18 --state-dict ckpt.pt --data images.pt \\
        --batch-size 64 --num-batches 200 --output recalibrated.pt
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from .._io import atomic_write

__all__ = ["add_subcommands", "main", "CLIError", "load_model", "load_state_dict_file", "write_atomic"]


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def load_model(spec: str) -> nn.Module:
    """Import ``package.module:factory`` and call ``factory()``; it must return an ``nn.Module``."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise CLIError(f"model must be given as package.module:factory, got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as err:
        raise CLIError(f"cannot import {mod_name!r} ({err}); is it on PYTHONPATH?") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{spec} is not callable; give a function or class that builds the model")
    try:
        model = obj()
    except Exception as err:
        raise CLIError(f"{spec}() raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_tensor_file(path: str, what: str):
    if not os.path.isfile(path):
        raise CLIError(f"{what} file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage, or a pickle needing arbitrary globals
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CLIError(
            f"cannot read {what} file {path!r}: not a complete torch.save file of tensors "
            f"({type(err).__name__}: {first[:160]})"
        ) from err


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """Load ``path`` (``torch.load(weights_only=True)``) into ``model`` strictly, or raise :class:`CLIError`.

    A checkpoint dict with a ``"state_dict"`` entry is unwrapped. The model is only
    changed when the file is a state_dict that matches it exactly.
    """
    sd = _load_tensor_file(path, "state_dict")
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CLIError(f"{path!r} is not a state_dict (a dict of parameter names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise CLIError(f"state_dict {path!r} does not match the model; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def write_atomic(path: str, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then ``os.replace`` it over ``path``.

    Refuses (``CLIError``) when ``path``'s folder does not exist rather than creating it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CLIError(f"output directory {directory!r} does not exist")
    atomic_write(path, write)


def _write_json(path: str, data: dict) -> Callable:
    return lambda f: f.write(json.dumps(data, indent=2).encode())


def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise CLIError(f"shape must be positive integers like 8,3,32,32 (N,C,...), got {text!r}")
    return shape


def _prepare(args) -> nn.Module:
    model = load_model(args.model)
    if args.state_dict:
        load_state_dict_file(model, args.state_dict)
    return model


def _check_output(path: str) -> None:
    if os.path.isdir(path):
        raise CLIError(f"output {path!r} is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CLIError(f"output directory {directory!r} does not exist")


def _run(fn):
    def wrapped(args):
        try:
            return fn(args)
        except CLIError as err:
            print(f"batchnorm {args.command}: error: {err}", file=sys.stderr)
            return 2

    return wrapped


@_run
def cmd_fold(args) -> int:
    from .fold import fold_batchnorm

    for out in (args.output, args.json):
        if out:
            _check_output(out)
    model = _prepare(args)
    folded, report = fold_batchnorm(model)
    print(report)
    if args.output:
        write_atomic(args.output, lambda f: torch.save(folded.state_dict(), f))
    if args.json:
        write_atomic(args.json, _write_json(args.json, report.to_dict()))
    return 0


@_run
def cmd_doctor(args) -> int:
    from .doctor import diagnose

    if args.json:
        _check_output(args.json)
    model = _prepare(args)
    if args.input:
        x = _load_tensor_file(args.input, "input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise CLIError(f"input file {args.input!r} must hold one floating-point tensor (a batch)")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(_parse_shape(args.input_shape), generator=gen)
        print(f"note: example input is random N(0, 1) of shape {tuple(x.shape)}; pass --input for real data",
              file=sys.stderr)  # fmt: skip
    if not args.keep_mode:
        model.eval()
    try:
        report = diagnose(model, x)
    except ValueError as err:
        raise CLIError(str(err)) from err
    print(report)
    if args.json:
        write_atomic(args.json, _write_json(args.json, report.to_dict()))
    return 0


def _batches_from(args):
    if args.data:
        data = _load_tensor_file(args.data, "data")
        if isinstance(data, torch.Tensor):
            if data.dim() < 2 or not data.is_floating_point():
                raise CLIError(f"data tensor in {args.data!r} must be floating point with shape (samples, C, ...)")
            return list(torch.split(data, args.batch_size))
        if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
            return list(data)
        raise CLIError(f"data file {args.data!r} must hold a tensor (samples, C, ...) or a list of batch tensors")
    shape = _parse_shape(args.synthetic)
    print(
        f"warning: recalibrating on random N(0, 1) batches of shape {shape}: the statistics describe random "
        f"inputs, not your data; use --data for real statistics",
        file=sys.stderr,
    )
    gen = torch.Generator().manual_seed(args.seed)
    return (torch.randn(shape, generator=gen) for _ in range(args.num_batches))


@_run
def cmd_recalibrate(args) -> int:
    from .recalibrate import recalibrate

    _check_output(args.output)
    if args.batch_size < 1 or args.num_batches < 1:
        raise CLIError("--batch-size and --num-batches must be positive")
    model = _prepare(args)
    batches = _batches_from(args)
    try:
        counts = recalibrate(model, batches, args.num_batches, quiet=args.quiet)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CLIError(f"recalibration failed, nothing written: {str(err).splitlines()[0] if str(err) else err!r}") from err
    for name, n in counts.items():
        print(f"{name or '<model>'}: {n} values per channel" + ("" if n else " (not reached; kept)"))
    write_atomic(args.output, lambda f: torch.save(model.state_dict(), f))
    print(f"wrote {args.output}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model factory as package.module:callable (called with no arguments)")
    p.add_argument("--state-dict", metavar="FILE", help="state_dict to load (torch.load with weights_only=True)")


def add_subcommands(subparsers) -> None:
    """Register ``fold``, ``doctor`` and ``recalibrate`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("fold", help="fold batch norms into neighbouring Conv/Linear layers for inference",
                              description="Fold every BN into the Conv/Linear next to it; print what was folded. "
                              "--output holds the folded model's state_dict: load it into "
                              "batchnorm.tools.fold_batchnorm(factory())[0].")  # fmt: skip
    _common(p)
    p.add_argument("--output", metavar="FILE", help="write the folded model's state_dict here (atomically)")
    p.add_argument("--json", metavar="FILE", help="write the fold report as JSON")
    p.set_defaults(func=cmd_fold)

    p = subparsers.add_parser("doctor", help="find batch-norm pitfalls in a model",
                              description="Diagnose BN pitfalls on one example batch; the model is put in eval "
                              "mode first unless --keep-mode.")  # fmt: skip
    _common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE", help="example batch: a tensor saved with torch.save")
    src.add_argument("--input-shape", metavar="N,C,...", help="use a random N(0,1) batch of this shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-mode", action="store_true", help="keep the factory's train/eval mode")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.set_defaults(func=cmd_doctor)

    p = subparsers.add_parser("recalibrate", help="recompute exact BN running statistics over data",
                              description="Set every BN's running mean/var to the exact pooled statistics "
                              "over the batches; writes the model's state_dict.")  # fmt: skip
    _common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE", help="tensor (samples, C, ...) or list of batches, saved with torch.save")
    src.add_argument("--synthetic", metavar="N,C,...", help="random N(0,1) batches of this shape (warns)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size when --data is one tensor (default 32)")
    p.add_argument("--num-batches", type=int, default=200, help="use at most this many batches (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", metavar="FILE", required=True, help="write the recalibrated state_dict here")
    p.set_defaults(func=cmd_recalibrate)


def main(argv=None) -> int:
    """Run one tools command (``fold``, ``doctor``, ``recalibrate``) without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="batchnorm")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_subcommands(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
