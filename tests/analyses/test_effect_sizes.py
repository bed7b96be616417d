"""Effect sizes with intervals: partial eta squared by noncentral-F inversion, Hedges' g by pingouin's SE."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from analyses.stats import (
    hedges_ci,
    np2_ci,
    pairwise_between,
    pairwise_within,
    rm_anova,
)

from .conftest import GROUP, rm_frame


@pytest.mark.parametrize("F,df1,df2", [(10.2, 3, 27), (1.4, 5, 40), (0.2, 2, 18)])
def test_np2_interval_inverts_the_noncentral_f(F, df1, df2):
    low, high = np2_ci(F, df1, df2)
    n = df1 + df2 + 1
    lam = lambda e: e * n / (1 - e)  # noqa: E731 - back from eta to the noncentrality
    assert sps.ncf.cdf(F, df1, df2, lam(high)) == pytest.approx(0.025, abs=1e-6)
    if low > 0:
        assert sps.ncf.cdf(F, df1, df2, lam(low)) == pytest.approx(0.975, abs=1e-6)
    else:  # even no effect leaves F below the 97.5 % point
        assert sps.f.cdf(F, df1, df2) <= 0.975
    assert 0 <= low < high < 1


def test_rm_anova_np2_interval_contains_the_estimate():
    rng = np.random.default_rng(2)
    values = rng.normal(0, 1, (12, 4)) + np.array([0, 0.5, 1, 0.2])
    row = rm_anova(rm_frame(values)).iloc[0]
    assert row["np2_ci_low"] <= row["np2"] <= row["np2_ci_high"]
    assert (row["np2_ci_low"], row["np2_ci_high"]) == pytest.approx(np2_ci(row["F"], row["ddof1"], row["ddof2"]))


def test_hedges_intervals_of_pairwise_tests_match_the_formula():
    rng = np.random.default_rng(3)
    values = rng.normal(0, 1, (10, 3)) + np.array([0, 0.8, 0.3])
    post = pairwise_within(rm_frame(values))
    n = 10
    g = post["hedges"].to_numpy()
    half = sps.t.ppf(0.975, n - 1) * np.sqrt(1 / n + g**2 / (2 * n))
    np.testing.assert_allclose(post["hedges_ci_low"], g - half, rtol=1e-9)
    np.testing.assert_allclose(post["hedges_ci_high"], g + half, rtol=1e-9)
    groups = ["a"] * 4 + ["b"] * 6
    between = pairwise_between(rm_frame(values, groups), between=GROUP)
    g = between["hedges"].to_numpy()
    half = sps.t.ppf(0.975, 8) * np.sqrt(10 / 24 + g**2 / 20)
    np.testing.assert_allclose(between["hedges_ci_low"], g - half, rtol=1e-9)
    low, high = hedges_ci(np.array([np.nan]), 5)
    assert np.isnan(low[0]) and np.isnan(high[0])
