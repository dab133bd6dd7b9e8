r"""The evaluation protocol every comparison follows: seeds, spread, tuning on validation data, verdicts.

1. **Seeds.** Every arm runs with ``n >= 5`` seeds (``--seeds``); seed ``s`` fixes the
   initial weights and the batch order, and both arms of a comparison use the same
   seeds, so their results pair up seed by seed.
2. **Spread.** Every number is reported as mean ± sample standard deviation over the
   seeds; a comparison is the per-seed paired difference (or ratio), with its mean, std
   and a 95% confidence interval from Student's t with ``n - 1`` degrees of freedom:
   ``mean ± t_{0.975, n-1} * std / sqrt(n)``.
3. **Learning rates.** Each arm runs at *its own* best rate from a stated grid, chosen by
   :func:`select_lr` on the **validation** split (held out of the training data): the
   highest mean over the tuning seeds of the validation accuracy averaged over the
   run's evaluation points (the area under the validation curve, which rewards reaching
   a good accuracy early *and* ending high). The test split is never used for a choice.
   Tuning uses the first ``tune_seeds`` seeds on every grid point; the chosen rate is
   then run with all ``n`` seeds. A choice at the edge of the grid is flagged.
4. **Verdicts** (:data:`VERDICT_RULE`): a claim is tested in one or more stated
   settings; in each, the 95% CI of the paired effect must lie on the paper's side of
   zero. *reproduced*: in every setting; *partly*: in some; *not reproduced*: in none.
   Claims of equality (the bias is redundant; BN's output does not depend on the weight
   scale) are *reproduced* when the CI lies inside a stated tolerance.

Example::

    >>> d = paired([0.97, 0.96, 0.98, 0.97, 0.97], [0.95, 0.95, 0.96, 0.96, 0.94])
    >>> d.mean > 0 and d.lo > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Stat", "T95", "VERDICT_RULE", "fmt_ratio", "pct", "paired", "ratio_stat", "reach", "select_lr", "stat",
           "verdict"]

#: two-sided 95% quantiles of Student's t by degrees of freedom (n - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}

VERDICT_RULE = (
    "A claim is tested in one or more stated settings. In each, the per-seed paired effect (our arm minus, or "
    "divided by, the baseline of the same seed) must have a 95% confidence interval (Student's t, n - 1 degrees "
    "of freedom) entirely on the side of zero that the paper claims. **reproduced**: in every setting; "
    "**partly**: in some settings but not all; **not reproduced**: in none. Claims of equality are reproduced "
    "when the interval lies inside the stated tolerance. Every arm is at its own best learning rate, chosen on "
    "the validation split (never the test split) from the stated grid.")


def _t(dof: int) -> float:
    if dof <= 0:
        return float("inf")
    keys = [k for k in T95 if k <= dof]
    return T95[max(keys)] if dof <= 29 else 1.96


@dataclass
class Stat:
    """Mean, sample std and 95% CI (Student's t) of per-seed values."""

    values: list
    mean: float
    std: float
    lo: float
    hi: float

    @property
    def n(self) -> int:
        return len(self.values)

    def fmt(self, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
        """``"mean ± std unit"``; e.g. ``stat([.97, .96]).fmt(100, 1, "%")`` -> ``'96.5 ± 0.7%'``."""
        if not self.values:
            return "—"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}{unit}"

    def to_json(self) -> dict:
        return {"values": self.values, "mean": self.mean, "std": self.std, "ci95": [self.lo, self.hi], "n": self.n}


def stat(values: Sequence[float]) -> Stat:
    """:class:`Stat` of ``values`` (NaN-free); std with ``n - 1`` in the denominator (0 for one value)."""
    v = [float(x) for x in values]
    if not v:
        return Stat([], float("nan"), float("nan"), float("nan"), float("nan"))
    a = np.asarray(v, dtype=np.float64)
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    half = _t(len(a) - 1) * std / math.sqrt(len(a)) if len(a) > 1 else float("inf")
    return Stat(v, mean, std, mean - half, mean + half)


def paired(a: Sequence[float], b: Sequence[float]) -> Stat:
    """Per-seed differences ``a[i] - b[i]`` (same seeds in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values vs {len(b)}; both arms must run the same seeds")
    return stat([x - y for x, y in zip(a, b)])


def pct(s: Stat, digits: int = 1) -> str:
    """An accuracy :class:`Stat` (fractions) as ``"97.1 ± 0.4%"``."""
    return s.fmt(100, digits, "%")


def reach(steps: Sequence[int], accs: Sequence[float], threshold: float) -> int | None:
    """First recorded step whose accuracy is ``>= threshold``, or ``None`` if never."""
    for s, a in zip(steps, accs):
        if a >= threshold:
            return int(s)
    return None


def ratio_stat(base: Sequence[int | None], ours: Sequence[int | None], budget: int) -> dict:
    """Per-seed speed-up ``base[i] / ours[i]`` of steps-to-threshold, with censoring.

    A baseline that never reached the threshold counts as ``budget`` steps (so the ratio
    is a lower bound, marked ``censored``); a seed where *our* arm never reached it gives
    no ratio (counted in ``ours_missing``). Statistics are taken on ``log(ratio)``; the
    returned ``"gmean"`` and CI are back-transformed, ``"mean"``/``"std"`` are of the
    ratios themselves. Example::

        >>> ratio_stat([400, 500, None], [200, 250, 100], budget=3000)["censored"]
        1
    """
    ratios, censored, missing = [], 0, 0
    for b, o in zip(base, ours):
        if o is None or o == 0:
            missing += 1
            continue
        if b is None:
            censored += 1
            b = budget
        ratios.append(max(b, 1) / o)
    if not ratios:
        return {"ratios": [], "censored": censored, "ours_missing": missing, "mean": None, "std": None,
                "gmean": None, "ci95": [None, None]}
    logs = stat([math.log(r) for r in ratios])
    plain = stat(ratios)
    return {"ratios": ratios, "censored": censored, "ours_missing": missing, "mean": plain.mean, "std": plain.std,
            "gmean": math.exp(logs.mean), "ci95": [math.exp(logs.lo) if math.isfinite(logs.lo) else 0.0,
                                                   math.exp(logs.hi) if math.isfinite(logs.hi) else float("inf")]}


def fmt_ratio(r: dict) -> str:
    """``"2.4x ± 0.3 (5 seeds)"``, with ``>=`` when some baselines never reached the threshold."""
    if not r["ratios"]:
        return "— (our arm never reached the threshold)"
    ge = ">= " if r["censored"] else ""
    s = f"{ge}{r['mean']:.1f}x ± {r['std']:.1f}"
    notes = []
    if r["censored"]:
        notes.append(f"baseline never reached it in {r['censored']} of {len(r['ratios'])} seeds")
    if r["ours_missing"]:
        notes.append(f"our arm never reached it in {r['ours_missing']} seeds")
    return s + (f" ({'; '.join(notes)})" if notes else "")


def select_lr(scores: dict) -> tuple[float, bool]:
    """``(best learning rate, at_edge)`` from ``{lr: [validation score per tuning seed]}``.

    The score is the mean over seeds; ``NaN`` (a diverged run) counts as 0. ``at_edge``
    says the best rate is the smallest or largest of the grid (the grid may be too narrow).
    """
    if not scores:
        raise ValueError("select_lr: no learning rates were run")
    means = {lr: float(np.mean([0.0 if (v is None or v != v) else v for v in vals])) for lr, vals in scores.items()}
    best = max(sorted(means), key=lambda lr: means[lr])
    grid = sorted(means)
    return best, len(grid) > 1 and best in (grid[0], grid[-1])


def verdict(shown: Sequence[bool]) -> str:
    """``"reproduced"`` if the effect is shown in every setting, ``"partly"`` in some, else ``"not reproduced"``."""
    shown = list(shown)
    if shown and all(shown):
        return "reproduced"
    if any(shown):
        return "partly"
    return "not reproduced"
