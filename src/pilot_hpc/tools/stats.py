"""The statistics a study reports next to its means (pure functions on numbers).

Conventions, stated once so that every table says the same thing:
- "sd" is the sample standard deviation over seeds (denominator n - 1).
- The interval of a mean over seeds is Student's t interval, mean +- t_{0.975, n-1} sd / sqrt(n).
- Across seeds, A against B is a paired t-test on the per-seed differences (two-sided).
- Within the items, A against B is a paired bootstrap over the evaluation items: items
  are resampled with replacement within each seed (an item keeps all its clients' scores
  together, since the clients of a task are scored on the same items and correlate),
  and the two-sided p-value is twice the smaller tail of the resampled mean difference
  around 0.
- Two scores are tied when they agree to the metric's 4 decimals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

DECIMALS = 4  # metrics.json keeps every score to 4 decimals


def tied(d: float) -> bool:
    return round(abs(d), DECIMALS) == 0.0


@dataclass
class MeanInterval:
    mean: float
    sd: float  # sample sd (n - 1); NaN for one value
    low: float  # t-based 95% interval; NaN for one value
    high: float
    n: int


def t_interval(values, level: float = 0.95) -> MeanInterval:
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return MeanInterval(mean, math.nan, math.nan, math.nan, n)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return MeanInterval(mean, sd, mean - half, mean + half, n)


def paired_t_p(diffs) -> float:
    """Two-sided p of the paired t-test on per-seed differences (NaN below two seeds; 1.0
    when every difference is 0, NaN-free)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return math.nan
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(sps.ttest_1samp(d, 0.0).pvalue)


@dataclass
class BootstrapResult:
    mean: float  # the observed mean difference (over seeds of the per-seed item means)
    low: float
    high: float
    p: float
    items: int  # items per seed, summed


def paired_bootstrap(per_seed: list[np.ndarray], reps: int = 2000, seed: int = 0, level: float = 0.95
                     ) -> BootstrapResult:
    """per_seed: for each seed the A - B difference of every evaluation item (averaged over
    the task's clients that scored it). The statistic is the mean over seeds of the mean
    over items."""
    rng = np.random.default_rng(seed)
    per_seed = [np.asarray(d, dtype=np.float64) for d in per_seed]
    observed = float(np.mean([d.mean() for d in per_seed]))
    draws = np.zeros(reps)
    for item_means in per_seed:
        idx = rng.integers(0, len(item_means), size=(reps, len(item_means)))
        draws += item_means[idx].mean(axis=1)
    draws /= len(per_seed)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    if np.all(draws == 0):
        p = 1.0
    else:
        p = float(min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0))))
    return BootstrapResult(observed, float(lo), float(hi), p, sum(len(d) for d in per_seed))
