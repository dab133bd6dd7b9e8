"""SyncBatchNorm under faults, with 2-3 gloo processes on 127.0.0.1: every surviving rank raises the
same clear error, no rank updates anything, and no rank waits longer than the layer's timeout."""

import time

import pytest

from .test_sync import JOIN_S, _launch

#: kind -> (world, the message every good rank must report)
FAULTS = {
    "channels": (2, "different channel counts [3, 4]"),  # the layers differ: the first-call handshake
    "dtype": (2, "disagree in dtypes: ['float32', 'float64']"),
    "input": (3, "rank(s) [2] rejected their input"),  # rank 2's own error is the channel mismatch
    "nan": (3, "not finite"),
    "raises": (2, "timed out after 4 s"),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_every_rank_raises_the_same_clear_error_and_changes_nothing(kind, tmp_path):
    world, message = FAULTS[kind]
    t0 = time.monotonic()
    codes, errs, logs = _launch(world, f"fault-{kind}", tmp_path)
    elapsed = time.monotonic() - t0
    good = range(world - 1)
    for r in good:
        assert codes[r] == 3, f"rank {r}: exit {codes[r]}; log {logs[r]}"
        assert message in errs[r], errs[r]
        assert (tmp_path / f"rank{r}.state").read_text() == "unchanged"
    bad = world - 1
    assert codes[bad] == 3 and bad in errs
    if kind == "input":
        assert "input has 5 channels" in errs[bad] and (tmp_path / f"rank{bad}.state").read_text() == "unchanged"
    assert elapsed < JOIN_S
