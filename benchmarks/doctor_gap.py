"""How often the doctor's train_eval_gap check fires on correctly built, exactly calibrated networks.

For each model of the test zoo (tests/tools/zoo.py: ResNet-, MobileNetV2-, EfficientNet- and
DenseNet-style, 32x32 inputs) and each seed: build, recalibrate on 16 batches of 32 images, then
diagnose a fresh batch of 8 and of 32. Prints, per model and batch size, the layers judged, how many
a fixed 0.1 threshold (the doctor before issue 10) would flag, how many the noise-derived limit flags,
the ratio gap / expected sampling gap (median, 99th percentile, max) and the limits used.

    python benchmarks/doctor_gap.py [--seeds 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from batchnorm.tools import diagnose, recalibrate  # noqa: E402
from tests.tools.zoo import ZOO, images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)  # counts, not timings: one thread is fastest on a shared 2-core machine
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"torch {torch.__version__}; {args.seeds} seeds")  # fmt: skip
    rows = {}
    t0 = time.perf_counter()
    for name, cls in ZOO.items():
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = cls().eval()
            recalibrate(model, [images(32, 1000 + 100 * seed + i) for i in range(16)], quiet=True)
            for n in (8, 32):
                report = diagnose(model, images(n, 7 + seed))
                r = rows.setdefault((name, n), {"layers": 0, "fixed": 0, "new": 0, "ratio": [], "limit": []})
                judged = [li for li in report.layers if li.gap is not None and li.gap_noise is not None]
                r["layers"] += len(judged)
                r["fixed"] += sum(li.gap > 0.1 for li in judged)
                r["new"] += len(report.checks("train_eval_gap"))
                r["ratio"] += [li.gap / li.gap_noise for li in judged]
                r["limit"] += [li.gap_limit for li in judged]
        print(f"  {name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print("\n| model | batch | layers judged | flagged by fixed 0.1 | flagged by derived limit "
          "| gap/expected median | 99th pct | max | limit median | limit max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, n), r in rows.items():
        ratio, limit = torch.tensor(r["ratio"]), torch.tensor(r["limit"])
        print(f"| {name} | {n} | {r['layers']} | {r['fixed']} | {r['new']} | {ratio.median():.2f} | "
              f"{ratio.quantile(0.99):.2f} | {ratio.max():.2f} | {limit.median():.3f} | "
              f"{limit.max():.3f} |")  # fmt: skip
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
