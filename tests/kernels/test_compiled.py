"""The compiled-code check (benchmarks/compiled.py) passes on the kernels, and fails when it should.

It compiles for sm_90 ahead of time with Triton's bundled ptxas, so it needs no GPU; it runs
in a subprocess because this test session runs Triton in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"bn_stats_partial_kernel", "bn_stats_finalize_kernel", "bn_apply_kernel", "bn_bwd_reduce_kernel",
           "bn_bwd_finalize_kernel", "bn_bwd_dx_kernel"}


def _run(args, tmp_path, code=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "benchmarks/compiled.py"]
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_compiled_check_passes(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--quick", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "compiled.json").read_text())
    assert result["failures"] == []
    kernels = {row[4] for row in result["rows"]}
    assert kernels == KERNELS, kernels  # the few-channel cases need the finalize kernels
    # 7x7 NCHW rows of 49 values allow 4-byte float32 accesses only; everything else 8-16 bytes
    widths = {tuple(row[1:4]): row[9] for row in result["rows"] if row[4] == "bn_apply_kernel"}
    assert widths[("nchw", "float32", "56x56")] == "16" and widths[("nchw", "float32", "7x7")] == "4"
    assert widths[("nchw", "bfloat16", "14x14")] == "8" and widths[("channels_last", "bfloat16", "7x7")] == "16"
    assert "0 failing launch(es)." in proc.stdout


def test_compiled_check_fails_on_narrow_loads(tmp_path):
    # the check is not vacuous: without the alignment hints (VEC = 1) a 56x56 float32 NCHW layer
    # compiles to 4-byte accesses where 16-byte ones are allowed, and the check says so
    code = ("import sys; sys.path.insert(0, 'src'); sys.path.insert(0, '.');"
            "from batchnorm.kernels import launch; launch._vector_width = lambda *a: 1;"
            "import benchmarks.compiled as c; sys.exit(c.main(sys.argv[1:]))")
    proc = _run(["--only", r"\(32, 64, 56, 56\) nchw float32"], tmp_path, code)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loads 4 B < 16 B allowed" in proc.stdout
