"""``batchnorm fold | doctor | recalibrate``: the model tools on the command line.

Every command takes the model as ``package.module:factory`` - an importable callable that
returns the ``nn.Module`` (called without arguments; the current directory is importable, as
with ``python -m``) - and optionally ``--state-dict FILE``, read with
``torch.load(FILE, weights_only=True)`` (tensors and containers only; arbitrary pickled objects
are refused). Any failure - a factory that cannot be imported, raises or exits, a file that is
missing, a directory, truncated, of the wrong kind or not matching the model, data with NaN,
an output that is not a regular file or cannot be written - ends the command with one line
``batchnorm COMMAND: error: ...`` on stderr and exit status 2, before anything is written.
Outputs are written by :func:`batchnorm._io.atomic_write`: whole or not at all, only over
regular files (symlinks are written through), with the user's umask.

Examples::

    batchnorm doctor mypkg.models:resnet18 --state-dict ckpt.pt --input-shape 8,3,224,224
    batchnorm fold mypkg.models:resnet18 --state-dict ckpt.pt --input-shape 1,3,224,224 --output folded.pt
    batchnorm recalibrate mypkg.models:resnet18 --state-dict ckpt.pt --data images.pt \\
        --batch-size 64 --num-batches 200 --output recalibrated.pt
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Mapping
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from .._io import OutputError, atomic_write, resolve_output
from ..cli import CLIError, Parser, dispatch

__all__ = [
    "add_subcommands", "main", "run", "CLIError", "load_model", "load_state_dict_file", "load_tensor_file",
    "write_atomic", "MAX_EXAMPLE_ELEMENTS",
]  # fmt: skip

#: the largest random example/synthetic batch the commands create (elements; 2**28 float32 = 1 GiB)
MAX_EXAMPLE_ELEMENTS = 2**28


# --- the model ----------------------------------------------------------------------------------


def _import_error(mod_name: str, err: BaseException) -> CLIError:
    missing = getattr(err, "name", None)
    if isinstance(err, ModuleNotFoundError) and missing and (mod_name == missing or mod_name.startswith(missing + ".")):
        return CLIError(
            f"cannot import {mod_name!r}: no module named {err.name!r} in the current directory or on PYTHONPATH"
        )
    if isinstance(err, SystemExit):
        return CLIError(f"importing {mod_name!r} called sys.exit({err.code!r}); the model module must not exit")
    if isinstance(err, SyntaxError):
        return CLIError(f"importing {mod_name!r} failed: SyntaxError: {err.msg} ({err.filename}, line {err.lineno})")
    return CLIError(f"importing {mod_name!r} failed: {type(err).__name__}: {err}")


def load_model(spec: str) -> nn.Module:
    """Import ``package.module:factory`` and call ``factory()``; it must return an ``nn.Module``.

    The current directory is searched first, as ``python -m`` does. Everything the factory's
    module raises at import or the factory raises when called - including ``SystemExit`` - becomes
    a :class:`CLIError` that names it.

    Example::

        >>> model = load_model("torchvision.models:resnet18")
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise CLIError(f"model must be given as package.module:factory, got {spec!r}")
    mod_name, attr = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # what `python -m` does; the installed command's path lacks it
    try:
        obj = importlib.import_module(mod_name)
    except (Exception, SystemExit) as err:
        raise _import_error(mod_name, err) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{spec} is not callable; give a function or class that builds the model")
    try:
        model = obj()
    except SystemExit as err:
        raise CLIError(f"{spec}() called sys.exit({err.code!r}) instead of returning a model") from err
    except Exception as err:
        raise CLIError(f"{spec}() raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


# --- reading files ------------------------------------------------------------------------------


def _check_input_path(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        broken = " (a broken symlink)" if os.path.islink(path) else ""
        raise CLIError(f"{what} file {path!r} does not exist{broken}") from None
    except OSError as err:
        raise CLIError(f"cannot read {what} file {path!r}: {err.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CLIError(f"{what} path {path!r} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise CLIError(f"{what} path {path!r} is not a regular file (a FIFO, device or socket); give a file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"cannot read {what} file {path!r}: permission denied")


def load_tensor_file(path: str, what: str, allow: Sequence[type] = ()):
    """``torch.load(path, weights_only=True)``, or a :class:`CLIError` that says what is wrong.

    ``allow``: extra classes that may be unpickled (e.g. ``TensorDataset`` for data files).
    Distinguishes a missing path, a directory or special file, a truncated/foreign file and a
    pickled object of a type that is not allowed (named in the message).
    """
    _check_input_path(path, what)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found:
            raise CLIError(
                f"{what} file {path!r} holds a pickled Python object ({found.group(1)}), which is not loaded "
                f"(weights_only=True refuses objects that could run code); save plain tensors, lists or dicts of "
                f"tensors instead"
            ) from err
        first = _first_line(text)
        raise CLIError(
            f"cannot read {what} file {path!r}: it is not a complete torch.save file - truncated, or written by "
            f"something else ({type(err).__name__}: {first[:160]})"
        ) from err


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a dict with {len(obj)} entries"
    return f"a {type(obj).__name__}"


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """Load ``path`` (``torch.load(weights_only=True)``) into ``model`` strictly, or raise :class:`CLIError`.

    A checkpoint dict with a ``"state_dict"`` entry is unwrapped. The model is only
    changed when the file is a state_dict that matches it exactly.
    """
    sd = load_tensor_file(path, "state_dict")
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CLIError(f"{path!r} is not a state_dict (a dict of parameter names to tensors); it holds {_describe(sd)}")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise CLIError(f"state_dict {path!r} does not match the model; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


# --- writing files ------------------------------------------------------------------------------


def check_output(path: str) -> None:
    """Refuse, before any work, an output that could not be written: not a regular file (also through a
    symlink), a missing or non-writable folder."""
    try:
        target = resolve_output(path)
    except OutputError as err:
        raise CLIError(str(err)) from None
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise CLIError(f"cannot write {path!r}: folder {folder!r} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {path!r}: folder {folder!r} is not writable")
    probe = os.path.join(folder, f".{os.path.basename(target)}.{os.getpid()}.probe.tmp")
    try:  # access() says yes to root everywhere; only creating a file tells (read-only mounts, /proc, ...)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise CLIError(f"cannot write {path!r}: no file can be created in folder {folder!r} ({err.strerror})") from None
    os.unlink(probe)


def write_atomic(path: str, write: Callable) -> None:
    """Write via :func:`batchnorm._io.atomic_write` (no folder is created); an ``OSError`` becomes a ``CLIError``."""
    try:
        atomic_write(path, write, make_dirs=False)
    except OutputError as err:
        raise CLIError(str(err)) from err
    except OSError as err:
        raise CLIError(f"cannot write {path!r}: {err.strerror or err}; nothing was written") from err


def _check_outputs(*paths: Optional[str]) -> None:
    given = [p for p in paths if p]
    real = [os.path.realpath(p) for p in given]
    if len(set(real)) != len(real):
        raise CLIError(f"the output files {given} name the same file twice")
    for p in given:
        check_output(p)


def _write_json(data: dict) -> Callable:
    return lambda f: f.write((json.dumps(data, indent=2) + "\n").encode())


# --- examples and data --------------------------------------------------------------------------


def _parse_shape(text: str, option: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise CLIError(f"{option} must be positive integers like 8,3,32,32 (N,C,...), got {text!r}")
    n = math.prod(shape)
    if n > MAX_EXAMPLE_ELEMENTS:
        raise CLIError(
            f"{option} {text!r} is {n:,} values ({n * 4 / 2**30:.1f} GiB); at most {MAX_EXAMPLE_ELEMENTS:,} "
            f"({MAX_EXAMPLE_ELEMENTS * 4 // 2**30} GiB) - use a smaller batch"
        )
    return shape


def _randn(shape: tuple, seed: int) -> torch.Tensor:
    try:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    except (RuntimeError, MemoryError) as err:
        raise CLIError(f"cannot allocate a random batch of shape {shape}: {_first_line(str(err))[:120]}") from err


def _check_batch(x, path: str, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise CLIError(f"{what} file {path!r} must hold one tensor (a batch); it holds {_describe(x)}")
    if not x.is_floating_point() or x.dim() < 2:
        raise CLIError(f"{what} file {path!r} must hold a floating-point tensor of shape (N, C, ...); "
                       f"it holds {x.dtype} of shape {tuple(x.shape)}")  # fmt: skip
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise CLIError(f"{what} file {path!r} contains NaN/Inf in {bad} of {x.numel()} values; clean it first")
    return x


def _example(args) -> Optional[torch.Tensor]:
    """The example batch of ``doctor``/``fold``: ``--input FILE`` or a random ``--input-shape``."""
    if getattr(args, "input", None):
        return _check_batch(load_tensor_file(args.input, "input"), args.input, "input")
    if getattr(args, "input_shape", None):
        x = _randn(_parse_shape(args.input_shape, "--input-shape"), args.seed)
        print(f"note: example input is random N(0, 1) of shape {tuple(x.shape)}; pass --input for real data",
              file=sys.stderr)  # fmt: skip
        return x
    return None


def _prepare(args) -> nn.Module:
    model = load_model(args.model)
    if args.state_dict:
        load_state_dict_file(model, args.state_dict)
    return model


def _data_batches(args) -> List[torch.Tensor]:
    from torch.utils.data import TensorDataset

    data = load_tensor_file(args.data, "data", allow=(TensorDataset,))
    if isinstance(data, TensorDataset):
        data = data.tensors[0]  # (inputs, targets, ...): the inputs
    if isinstance(data, torch.Tensor):
        return list(torch.split(_check_batch(data, args.data, "data"), args.batch_size))
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return [_check_batch(t, args.data, f"data (batch {i})") for i, t in enumerate(data)]
    raise CLIError(
        f"data file {args.data!r} must hold a tensor (samples, C, ...), a list of batch tensors or a TensorDataset; "
        f"it holds {_describe(data)}"
    )


# --- the commands -------------------------------------------------------------------------------


def _report_warnings(command: str, caught) -> None:
    for w in caught:
        print(f"batchnorm {command}: warning: {w.message}", file=sys.stderr)


def cmd_fold(args) -> int:
    from .fold import fold_batchnorm

    _check_outputs(args.output, args.json)
    model = _prepare(args)
    example = _example(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            folded, report = fold_batchnorm(model, example_input=example)
        except ValueError as err:
            raise CLIError(f"{err} (nothing written)") from err
    _report_warnings("fold", caught)
    print(report)
    if args.output:
        write_atomic(args.output, lambda f: torch.save(folded.state_dict(), f))
    if args.json:
        write_atomic(args.json, _write_json(report.to_dict()))
    return 0


def cmd_doctor(args) -> int:
    from .doctor import diagnose

    _check_outputs(args.json)
    model = _prepare(args)
    x = _example(args)
    if not args.keep_mode:
        model.eval()
    try:
        report = diagnose(model, x)
    except ValueError as err:
        raise CLIError(str(err)) from err
    print(report)
    if args.json:
        write_atomic(args.json, _write_json(report.to_dict()))
    return 0


def cmd_recalibrate(args) -> int:
    from .recalibrate import recalibrate

    _check_outputs(args.output)
    if args.batch_size < 1 or (args.num_batches is not None and args.num_batches < 1):
        raise CLIError("--batch-size and --num-batches must be positive")
    model = _prepare(args)
    if args.data:
        batches = _data_batches(args)
        wanted = args.num_batches if args.num_batches is not None else 200
        if args.num_batches is not None and args.num_batches > len(batches):
            print(f"batchnorm recalibrate: warning: --num-batches {args.num_batches} asks for more than the data holds "
                  f"({len(batches)} batch(es) of up to {args.batch_size} samples from {args.data!r}); using all "
                  f"{len(batches)}", file=sys.stderr)  # fmt: skip
        num = min(wanted, len(batches))
        if num < len(batches):
            print(f"note: using {num} of the {len(batches)} batches in {args.data!r}", file=sys.stderr)
    else:
        shape = _parse_shape(args.synthetic, "--synthetic")
        num = args.num_batches if args.num_batches is not None else 200
        print(f"warning: recalibrating on random N(0, 1) batches of shape {shape}: the statistics describe random "
              f"inputs, not your data; use --data for real statistics", file=sys.stderr)  # fmt: skip
        batches = (_randn(shape, args.seed + i) for i in range(num))
    try:
        counts = recalibrate(model, batches, num, quiet=args.quiet)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CLIError(f"recalibration failed, nothing written: {_first_line(str(err)) or repr(err)}") from err
    for name, n in counts.items():
        print(f"{name or '<model>'}: {n} values per channel" + ("" if n else " (not reached; kept)"))
    write_atomic(args.output, lambda f: torch.save(model.state_dict(), f))
    print(f"wrote {args.output}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model factory as package.module:callable (called with no arguments; "
                                 "the current directory is importable)")  # fmt: skip
    p.add_argument("--state-dict", metavar="FILE", help="state_dict to load (torch.load with weights_only=True)")


def _example_options(p: argparse.ArgumentParser, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--input", metavar="FILE", help="example batch: one tensor saved with torch.save")
    src.add_argument("--input-shape", metavar="N,C,...", help="use a random N(0,1) batch of this shape")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch (default 0)")


def add_subcommands(subparsers) -> None:
    """Register ``fold``, ``doctor`` and ``recalibrate`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("fold", help="fold batch norms into neighbouring Conv/Linear layers for inference",
                              description="Fold every BN into the Conv/Linear next to it; print what was folded. "
                              "--output holds the folded model's state_dict: load it into "
                              "batchnorm.tools.fold_batchnorm(factory(), example)[0]. A BN next to a Linear is "
                              "folded only when an example (--input/--input-shape) shows it sees (N, C) "
                              "input.")  # fmt: skip
    _common(p)
    _example_options(p, required=False)
    p.add_argument("--output", metavar="FILE", help="write the folded model's state_dict here (atomically)")
    p.add_argument("--json", metavar="FILE", help="write the fold report as JSON")
    p.set_defaults(func=cmd_fold)

    p = subparsers.add_parser("doctor", help="find batch-norm pitfalls in a model",
                              description="Diagnose BN pitfalls on one example batch; the model is put in eval "
                              "mode first unless --keep-mode.")  # fmt: skip
    _common(p)
    _example_options(p, required=True)
    p.add_argument("--keep-mode", action="store_true", help="keep the factory's train/eval mode")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.set_defaults(func=cmd_doctor)

    p = subparsers.add_parser("recalibrate", help="recompute exact BN running statistics over data",
                              description="Set every BN's running mean/var to the exact pooled statistics "
                              "over the batches; writes the model's state_dict.")  # fmt: skip
    _common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE",
                     help="tensor (samples, C, ...), list of batches or TensorDataset, saved with torch.save")
    src.add_argument("--synthetic", metavar="N,C,...", help="random N(0,1) batches of this shape (warns)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size when --data is one tensor (default 32)")
    p.add_argument("--num-batches", type=int, default=None,
                   help="use this many batches (default: all of --data up to 200; 200 with --synthetic); "
                        "asking for more than --data holds is reported")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", metavar="FILE", required=True, help="write the recalibrated state_dict here")
    p.set_defaults(func=cmd_recalibrate)


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run one tools command (``fold``, ``doctor``, ``recalibrate``) and return the exit status."""
    parser = Parser(prog="batchnorm")
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return dispatch(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Like ``batchnorm.cli.main`` restricted to the tools commands: exits when reading the command line,
    returns the status for an ``argv`` list."""
    code = run(argv)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
