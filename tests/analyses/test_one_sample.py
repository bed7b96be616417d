"""Which layers recover at all: one-sample tests per layer (and group), Holm and BH across layers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from analyses.stats import one_sample

from .conftest import GROUP, rm_frame


def test_one_sample_matches_scipy_and_statsmodels():
    rng = np.random.default_rng(7)
    values = rng.normal([0.0, 0.05, 0.4, 0.9, 0.1], 0.3, size=(10, 5))
    table = one_sample(rm_frame(values))
    t, p = sps.ttest_1samp(values, 0.0, axis=0)
    np.testing.assert_allclose(table["T"], t)
    np.testing.assert_allclose(table["p_unc"], p)
    np.testing.assert_allclose(table["p_holm"], multipletests(p, method="holm")[1])
    np.testing.assert_allclose(table["p_fdr_bh"], multipletests(p, method="fdr_bh")[1])
    n = 10
    d = values.mean(0) / values.std(0, ddof=1)
    g = d * (1 - 3 / (4 * (n - 1) - 1))
    np.testing.assert_allclose(table["hedges"], g)
    half = sps.t.ppf(0.975, n - 1) * np.sqrt(1 / n + g**2 / (2 * n))  # pingouin's one-sample SE of g
    np.testing.assert_allclose(table["hedges_ci_low"], g - half, rtol=1e-9)
    sem = values.std(0, ddof=1) / np.sqrt(n)
    np.testing.assert_allclose(table["ci_high"], values.mean(0) + sps.t.ppf(0.975, n - 1) * sem)
    assert (table["dof"] == n - 1).all() and (table["note"] == "").all()


def test_one_sample_per_group_corrects_within_each_group():
    rng = np.random.default_rng(8)
    values = rng.normal(0.2, 0.3, size=(12, 4))
    groups = ["a" if i % 2 else "b" for i in range(12)]
    table = one_sample(rm_frame(values, groups), between=GROUP)
    assert len(table) == 8
    for g in ("a", "b"):
        part = table[table[GROUP] == g]
        x = values[[i for i in range(12) if groups[i] == g]]
        p = sps.ttest_1samp(x, 0.0, axis=0).pvalue
        np.testing.assert_allclose(part["p_holm"], multipletests(p, method="holm")[1])


def test_constant_level_is_undefined_not_infinite():
    values = np.column_stack([np.full(6, 0.5), np.linspace(0, 1, 6)])
    table = one_sample(rm_frame(values))
    assert np.isnan(table.loc[0, "T"]) and table.loc[0, "note"] == "undefined: the values do not vary"
    assert table.loc[1, "p_holm"] == pytest.approx(sps.ttest_1samp(values[:, 1], 0).pvalue)  # a family of one
