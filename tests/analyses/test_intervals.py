"""Intervals of means hold their coverage at study sizes: t by default, BCa on request."""

from __future__ import annotations

import numpy as np

from analyses import bootstrap_ci
from analyses.bootstrap import bca_interval, t_interval

from .conftest import rm_frame


def test_t_interval_covers_95_percent_at_six_probes():
    rng = np.random.default_rng(11)
    samples = rng.normal(0.3, 1.0, (2000, 6))
    low, high = t_interval(samples)
    coverage = np.mean((low < 0.3) & (high > 0.3))
    assert coverage >= 0.93
    # the percentile bootstrap the tables used before covers far less at this size
    idx = rng.integers(0, 6, (400, 1000, 6))
    boot = np.take_along_axis(samples[:400, None, :], idx, axis=2).mean(axis=2)
    pl, ph = np.quantile(boot, [0.025, 0.975], axis=1)
    assert np.mean((pl < 0.3) & (ph > 0.3)) < 0.9


def test_bca_interval_runs_vectorised_and_is_reasonable():
    """BCa is an option for skewed data with more probes; at n = 6 it under-covers too (about 88 %)."""
    rng = np.random.default_rng(12)
    samples = rng.normal(0.3, 1.0, (200, 6))
    low, high = bca_interval(samples, n_boot=999, seed=1)
    assert np.mean((low < 0.3) & (high > 0.3)) >= 0.8


def test_table_uses_t_intervals_by_default():
    values = np.random.default_rng(3).normal(0, 1, (8, 3))
    table = bootstrap_ci(rm_frame(values))
    low, high = t_interval(values.T)
    np.testing.assert_allclose(table["ci_low"], low)
    np.testing.assert_allclose(table["ci_high"], high)
    assert (table["method"] == "t").all()
    bca = bootstrap_ci(rm_frame(values), method="bca", n_boot=500, seed=1)
    assert (bca["method"] == "bca").all() and (bca["ci_low"] < bca["mean"]).all()
