"""The study's statistics on hand-computed cases (conventions in pilot_hpc/tools/stats.py)."""

import math

import numpy as np
import pytest

from pilot_hpc.tools import stats

T_975_2 = 4.302652729749464  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def test_t_interval_by_hand():
    got = stats.t_interval([1.0, 2.0, 3.0])
    assert (got.mean, got.sd, got.n) == (2.0, 1.0, 3)  # sd with n - 1: sqrt((1 + 0 + 1) / 2)
    half = T_975_2 * 1.0 / math.sqrt(3)
    assert got.low == pytest.approx(2.0 - half) and got.high == pytest.approx(2.0 + half)
    one = stats.t_interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.sd) and math.isnan(one.low)


def test_paired_t_p_by_hand():
    # t = mean / (sd / sqrt(n)) = 2 / (1 / sqrt 3) = 2 sqrt 3; with 2 df the t CDF is
    # 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12 / 14).
    assert stats.paired_t_p([1.0, 2.0, 3.0]) == pytest.approx(1 - math.sqrt(12 / 14))
    assert stats.paired_t_p([0.0, 0.0]) == 1.0 and stats.paired_t_p([2.0, 2.0]) == 0.0
    assert math.isnan(stats.paired_t_p([1.0]))


def test_ties_are_counted_to_four_decimals():
    assert stats.tied(0.0) and stats.tied(4e-5) and stats.tied(-4.9e-5) and stats.tied(1e-12)
    assert not stats.tied(6e-5) and not stats.tied(-0.0001)


def test_paired_bootstrap_edges_and_a_clear_case():
    zero = stats.paired_bootstrap([np.zeros(50), np.zeros(30)])
    assert (zero.mean, zero.low, zero.high, zero.p, zero.items) == (0.0, 0.0, 0.0, 1.0, 80)
    constant = stats.paired_bootstrap([np.full(20, 3.0)])
    assert (constant.mean, constant.low, constant.high, constant.p) == (3.0, 3.0, 3.0, 0.0)
    # Half the items +1, half -1: mean 0, an interval around 0 of about +-2 SE (SE = 1/sqrt(n)).
    mixed = stats.paired_bootstrap([np.array([1.0, -1.0] * 200)], reps=4000)
    assert mixed.mean == 0.0 and mixed.p > 0.5
    assert mixed.low == pytest.approx(-1.96 / 20, abs=0.03) and mixed.high == pytest.approx(1.96 / 20, abs=0.03)
    # Mostly positive: the interval excludes 0 and p is small.
    clear = stats.paired_bootstrap([np.array([1.0] * 300 + [-1.0] * 100)])
    assert clear.low > 0 and clear.p < 0.01
    # Seeded: the same answer twice.
    assert stats.paired_bootstrap([np.arange(9.0) - 3]) == stats.paired_bootstrap([np.arange(9.0) - 3])
