"""The README's usage example runs as written (a stale example is the first thing a new user meets)."""

import pathlib
import re

import torch

import batchnorm

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_use_block_runs():
    text = README.read_text()
    block = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S)
    assert block, "README.md has no '## Use' python block"
    scope: dict = {}
    exec(compile(block.group(1), str(README), "exec"), scope)
    assert isinstance(scope["bn"], torch.nn.BatchNorm2d) and isinstance(scope["bn"], batchnorm.BatchNorm2d)
    assert scope["y"].shape == (8, 64, 32, 32)
    assert int(scope["steps"]) == 1  # the functional call counted its step
    frozen = scope["model"][1]  # convert_sync_batchnorm, then freeze: buffers only, no batch statistics
    assert type(frozen) is batchnorm.FrozenBatchNorm  # SyncBatchNorm has no fixed rank
    assert list(frozen.parameters()) == [] and set(dict(frozen.named_buffers())) >= {"running_mean", "running_var"}
