"""The statistics agree with independent computations and behave as tests should on planted and null effects."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.anova import AnovaRM

from analyses import (
    friedman,
    mixed_anova,
    pairwise_between,
    pairwise_within,
    prepare,
    rm_anova,
)
from analyses.synthetic import make_results, power
from clap.errors import ClapError

from .conftest import GROUP, constant_results, rm_frame, wide

SEL = dict(metric="logit_diff", site_kind="resid_pre")


# ------------------------------------------------------------------------------------------- independent helpers


def gg_epsilon(x: np.ndarray) -> float:
    """Greenhouse-Geisser epsilon from the double-centred covariance matrix (Box 1954)."""
    s = np.cov(x, rowvar=False)
    dc = s - s.mean(axis=0, keepdims=True) - s.mean(axis=1, keepdims=True) + s.mean()
    k = x.shape[1]
    return float(np.trace(dc) ** 2 / ((k - 1) * np.sum(dc**2)))


def mauchly(x: np.ndarray) -> tuple[float, float]:
    """Mauchly's W and its p as R's ``mauchly.test`` computes it (chi-square with the second-order term)."""
    n, k = x.shape
    c = np.linalg.qr(np.vstack([np.ones(k), np.eye(k)[:-1]]).T)[0][:, 1:]  # k x (k-1), orthonormal, orthogonal to 1
    m = c.T @ np.cov(x, rowvar=False) @ c
    p, df = k - 1, n - 1
    w = np.linalg.det(m) / (np.trace(m) / p) ** p
    rho = 1 - (2 * p**2 + p + 2) / (6 * p * df)
    w2 = (p + 2) * (p - 1) * (p - 2) * (2 * p**3 + 6 * p**2 + 3 * k + 2) / (288 * (df * p * rho) ** 2)
    z = -df * rho * np.log(w)
    f = p * (p + 1) / 2 - 1
    p1, p2 = sps.chi2.sf(z, f), sps.chi2.sf(z, f + 4)
    return float(w), float(p1 + w2 * (p2 - p1))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values, written out."""
    p = np.asarray(p, float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def mixed_by_hand(y: np.ndarray, groups: np.ndarray) -> dict[str, tuple[float, float, int, int]]:
    """Split-plot ANOVA sums of squares: returns Source -> (F, p, df1, df2)."""
    n, k = y.shape
    labels = np.unique(groups)
    g = len(labels)
    grand = y.mean()
    ss_total = ((y - grand) ** 2).sum()
    ss_subjects = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_group = sum(k * (groups == lab).sum() * (y[groups == lab].mean() - grand) ** 2 for lab in labels)
    ss_err_between = ss_subjects - ss_group
    ss_layer = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_cells = sum((groups == lab).sum() * ((y[groups == lab].mean(axis=0) - grand) ** 2).sum() for lab in labels)
    ss_inter = ss_cells - ss_group - ss_layer
    ss_err_within = ss_total - ss_subjects - ss_layer - ss_inter
    df_b, df_eb = g - 1, n - g
    df_l, df_i, df_ew = k - 1, (g - 1) * (k - 1), (n - g) * (k - 1)
    f_g = (ss_group / df_b) / (ss_err_between / df_eb)
    f_l = (ss_layer / df_l) / (ss_err_within / df_ew)
    f_i = (ss_inter / df_i) / (ss_err_within / df_ew)
    return {
        "group": (f_g, sps.f.sf(f_g, df_b, df_eb), df_b, df_eb, ss_group / (ss_group + ss_err_between)),
        "layer": (f_l, sps.f.sf(f_l, df_l, df_ew), df_l, df_ew, ss_layer / (ss_layer + ss_err_within)),
        "Interaction": (f_i, sps.f.sf(f_i, df_i, df_ew), df_i, df_ew, ss_inter / (ss_inter + ss_err_within)),
    }


def hedges_paired(x: np.ndarray, y: np.ndarray) -> float:
    d = (x.mean() - y.mean()) / np.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    return d * (1 - 3 / (4 * (len(x) + len(y)) - 9))


def hedges_indep(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = len(x), len(y)
    pooled = np.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
    return (x.mean() - y.mean()) / pooled * (1 - 3 / (4 * (nx + ny) - 9))


# ----------------------------------------------------------------------------------------- repeated-measures ANOVA


def test_rm_anova_matches_statsmodels_and_hand_gg(results):
    prep = prepare(results, **SEL)
    table = rm_anova(results, **SEL)
    assert len(table) == 1
    row = table.iloc[0]
    ref = AnovaRM(prep.data, depvar="recovery", subject="probe_id", within=["layer"]).fit().anova_table.iloc[0]
    assert row["F"] == pytest.approx(ref["F Value"], rel=1e-9)
    assert row["ddof1"] == ref["Num DF"] and row["ddof2"] == ref["Den DF"]
    assert row["p_unc"] == pytest.approx(ref["Pr > F"], rel=1e-7)
    # Partial eta squared from F and degrees of freedom, and from the sums of squares.
    assert row["np2"] == pytest.approx(row["F"] * row["ddof1"] / (row["F"] * row["ddof1"] + row["ddof2"]), rel=1e-9)
    assert row["np2"] == pytest.approx(row["SS"] / (row["SS"] + row["SS_error"]), rel=1e-9)
    # Greenhouse-Geisser epsilon and corrected p computed by hand.
    x = wide(prep.data)
    eps = gg_epsilon(x)
    assert row["eps"] == pytest.approx(eps, rel=1e-7)
    assert row["p_GG_corr"] == pytest.approx(sps.f.sf(row["F"], eps * row["ddof1"], eps * row["ddof2"]), rel=1e-6)
    w, p_spher = mauchly(x)
    assert row["W_spher"] == pytest.approx(w, rel=1e-6)
    assert row["p_spher"] == pytest.approx(p_spher, rel=1e-5, abs=1e-12)
    assert row["sphericity"] == (p_spher > 0.05)
    # Book-keeping: one probe undefined, the missing cells' probes dropped.
    assert row["n_subjects"] == x.shape[0] == prep.n_subjects
    assert row["n_levels"] == 6
    assert row["n_dropped"] == len(prep.dropped_subjects) >= 1
    assert row["n_undefined"] > 0
    assert row["metric"] == "logit_diff" and row["site_kind"] == "resid_pre" and row["dv"] == "recovery"


def test_rm_anova_on_a_random_matrix_matches_statsmodels():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 4)) + np.array([0.0, 0.3, 0.9, 0.1]) + rng.normal(size=(9, 1))
    frame = rm_frame(x)
    row = rm_anova(frame).iloc[0]
    ref = AnovaRM(frame, depvar="recovery", subject="probe_id", within=["layer"]).fit().anova_table.iloc[0]
    assert row["F"] == pytest.approx(ref["F Value"], rel=1e-9)
    assert row["p_unc"] == pytest.approx(ref["Pr > F"], rel=1e-7)
    assert row["eps"] == pytest.approx(gg_epsilon(x), rel=1e-7)
    assert pd.isna(row["metric"])  # no such column in the input


def test_rm_anova_two_levels_equals_paired_t_squared():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 2)) + [0.0, 0.8]
    row = rm_anova(rm_frame(x)).iloc[0]
    t = sps.ttest_rel(x[:, 0], x[:, 1])
    assert row["F"] == pytest.approx(t.statistic**2, rel=1e-9)
    assert row["p_unc"] == pytest.approx(t.pvalue, rel=1e-7)
    assert row["eps"] == 1.0 and row["p_GG_corr"] == row["p_unc"]
    assert row["sphericity"] is True or row["sphericity"] == True  # noqa: E712 (numpy/pandas bool)
    assert np.isnan(row["W_spher"])


def test_mauchly_is_na_when_fewer_probes_than_levels():
    rng = np.random.default_rng(4)
    row = rm_anova(rm_frame(rng.normal(size=(3, 6)))).iloc[0]
    assert pd.isna(row["sphericity"]) and np.isnan(row["W_spher"]) and np.isnan(row["p_spher"])
    assert 0 < row["eps"] <= 1 and np.isfinite(row["F"])


def test_planted_layer_effect_is_detected():
    data = make_results(n_probes=16, n_layers=6, layer_effect=0.5, metrics=("logit_diff",), site_kinds=("resid_pre",),
                        seed=2)
    row = rm_anova(data, **SEL).iloc[0]
    assert row["p_GG_corr"] < 1e-6 and row["np2"] > 0.3
    fr = friedman(data, **SEL).iloc[0]
    assert fr["p_unc"] < 1e-4 and 0.2 < fr["W"] <= 1
    post = pairwise_within(data, **SEL)
    edge_vs_peak = post[(post["A"] == 0) & (post["B"].isin([2, 3]))]
    assert (edge_vs_peak["p_corr"] < 0.01).all() and (edge_vs_peak["diff"] < 0).all()


def test_no_planted_effect_gives_no_significance():
    """10 null studies: 4 or more rejections at 5 % would happen by chance with probability 0.001."""
    ps = [rm_anova(make_results(n_probes=16, n_layers=6, layer_effect=0.0, metrics=("logit_diff",),
                                site_kinds=("resid_pre",), seed=s), **SEL).iloc[0]["p_GG_corr"] for s in range(10)]
    assert sum(p < 0.05 for p in ps) <= 3


def test_null_layer_effect_rejected_at_nominal_rate():
    """200 null studies (compound-symmetric noise, so sphericity holds): the rejection rate of the uncorrected F
    test must lie in the central 99.8 % of Binomial(200, 0.05)."""
    n = 200
    rate = power(n, alpha=0.05, test="rm_anova", p_column="p_unc", layer_effect=0.0, n_probes=12, n_layers=5, seed=11)
    lo, hi = sps.binom.ppf(0.001, n, 0.05) / n, sps.binom.isf(0.001, n, 0.05) / n
    assert lo <= rate <= hi, rate
    rate_f = power(n, alpha=0.05, test="friedman", layer_effect=0.0, n_probes=12, n_layers=5, seed=12)
    assert rate_f <= hi, rate_f  # the chi-square approximation of Friedman's test is, if anything, conservative


def test_power_with_a_planted_effect_is_high():
    assert power(40, test="rm_anova", layer_effect=0.5, n_probes=12, n_layers=5, seed=5) >= 0.9


# --------------------------------------------------------------------------------------------------- Friedman


def test_friedman_matches_scipy(results):
    prep = prepare(results, **SEL)
    x = wide(prep.data)
    ref = sps.friedmanchisquare(*x.T)
    row = friedman(results, **SEL).iloc[0]
    assert row["Q"] == pytest.approx(ref.statistic, rel=1e-9)
    assert row["p_unc"] == pytest.approx(ref.pvalue, rel=1e-7)
    assert row["ddof1"] == x.shape[1] - 1
    assert row["W"] == pytest.approx(ref.statistic / (x.shape[0] * (x.shape[1] - 1)), rel=1e-9)


# ------------------------------------------------------------------------------------------------ mixed ANOVA


def test_mixed_anova_matches_hand_computation(results):
    prep = prepare(results, between=GROUP, **SEL)
    x = wide(prep.data)
    groups = prep.data.drop_duplicates("probe_id").set_index("probe_id").sort_index()[GROUP].to_numpy()
    ref = mixed_by_hand(x, groups)
    table = mixed_anova(results, between=GROUP, **SEL).set_index("Source")
    assert list(table.index) == [GROUP, "layer", "Interaction"]
    for source, key in ((GROUP, "group"), ("layer", "layer"), ("Interaction", "Interaction")):
        f, p, df1, df2, np2 = ref[key]
        assert table.loc[source, "F"] == pytest.approx(f, rel=1e-8)
        assert table.loc[source, "p_unc"] == pytest.approx(p, rel=1e-6, abs=1e-300)
        assert (table.loc[source, "ddof1"], table.loc[source, "ddof2"]) == (df1, df2)
        assert table.loc[source, "np2"] == pytest.approx(np2, rel=1e-8)
    assert np.isnan(table.loc[GROUP, "eps"])
    # The planted interaction is detected; the between-group main effect is not planted.
    assert table.loc["Interaction", "p_GG_corr"] < 1e-4


def test_mixed_anova_interaction_null_rate():
    n = 200
    rate = power(n, test="mixed_anova", p_column="p_unc", layer_effect=0.4, interaction=0.0, n_probes=12, n_layers=4,
                 seed=21)
    lo, hi = sps.binom.ppf(0.001, n, 0.05) / n, sps.binom.isf(0.001, n, 0.05) / n
    assert lo <= rate <= hi, rate


# ---------------------------------------------------------------------------------------------------- post hoc


def test_pairwise_within_matches_scipy_and_hand_holm(results):
    prep = prepare(results, **SEL)
    x = wide(prep.data)
    table = pairwise_within(results, **SEL)
    pairs = list(itertools.combinations(range(x.shape[1]), 2))
    assert len(table) == len(pairs)
    assert [(a, b) for a, b in zip(table["A"], table["B"], strict=True)] == pairs
    ref = [sps.ttest_rel(x[:, a], x[:, b]) for a, b in pairs]
    np.testing.assert_allclose(table["T"], [r.statistic for r in ref], rtol=1e-9)
    np.testing.assert_allclose(table["p_unc"], [r.pvalue for r in ref], rtol=1e-7)
    np.testing.assert_allclose(table["p_corr"], holm([r.pvalue for r in ref]), rtol=1e-7)
    np.testing.assert_allclose(table["hedges"], [hedges_paired(x[:, a], x[:, b]) for a, b in pairs], rtol=1e-7)
    np.testing.assert_allclose(table["diff"], [x[:, a].mean() - x[:, b].mean() for a, b in pairs], rtol=1e-9)
    assert (table["dof"] == x.shape[0] - 1).all() and (table["p_adjust"] == "holm").all()
    # The planted bump peaks in the middle: layer 0 vs the peak layer is a corrected-significant difference.
    peak = table[(table["A"] == 0) & (table["B"] == 3)].iloc[0]
    assert peak["p_corr"] < 0.05 and peak["diff"] < 0


def test_pairwise_between_matches_welch_and_hand_holm(results):
    prep = prepare(results, between=GROUP, **SEL)
    table = pairwise_between(results, between=GROUP, **SEL)
    assert list(table["level"]) == prep.levels
    refs, hedges = [], []
    for level in prep.levels:
        at = prep.data[prep.data["layer"] == level]
        a = at.loc[at[GROUP] == "associative", "recovery"].to_numpy()
        d = at.loc[at[GROUP] == "definitional", "recovery"].to_numpy()
        refs.append(sps.ttest_ind(a, d, equal_var=False))
        hedges.append(hedges_indep(a, d))
    assert (table["A"] == "associative").all() and (table["B"] == "definitional").all()
    np.testing.assert_allclose(table["T"], [r.statistic for r in refs], rtol=1e-9)
    np.testing.assert_allclose(table["p_unc"], [r.pvalue for r in refs], rtol=1e-7)
    np.testing.assert_allclose(table["p_corr"], holm([r.pvalue for r in refs]), rtol=1e-7)
    np.testing.assert_allclose(table["hedges"], hedges, rtol=1e-7)
    # The interaction ramps in opposite directions: the groups differ at both ends of the stack.
    assert table["p_corr"].iloc[0] < 0.05 and table["p_corr"].iloc[-1] < 0.05
    assert np.sign(table["diff"].iloc[0]) != np.sign(table["diff"].iloc[-1])


# ---------------------------------------------------------------------------------------- too little data


def test_single_probe_is_a_clear_error_not_a_nan_table(results):
    one = results[results["probe_id"] == "p000"]
    for func in (rm_anova, friedman, pairwise_within):
        with pytest.raises(ClapError, match=r"1 complete probe_id \(only 'p000'\).*at least 2 probes"):
            func(one, **SEL)


def test_group_with_too_few_probes_is_refused(results):
    keep = results[(results[GROUP] == "associative") | (results["probe_id"] == "p000")]
    with pytest.raises(ClapError, match=r"knowledge_type group\(s\) 'definitional' \(1 probes\).*at least 2"):
        mixed_anova(keep, between=GROUP, **SEL)
    only_one = results[results[GROUP] == "associative"]
    with pytest.raises(ClapError, match="only one knowledge_type group"):
        pairwise_between(only_one, between=GROUP, **SEL)


def test_single_layer_is_refused():
    frame = rm_frame(np.ones((5, 1)))
    with pytest.raises(ClapError, match="only 1 layer value"):
        rm_anova(frame)


# regression (review): data without variance gives a clear error, not a crash
@pytest.mark.parametrize("test", [rm_anova, friedman, pairwise_within])
def test_no_variance_is_a_clear_error(test):
    with pytest.raises(ClapError, match="do not vary"):
        test(constant_results(), dv="recovery", within="layer", subject="probe_id", metric="logit_diff")


def test_no_variance_mixed_anova():
    with pytest.raises(ClapError, match="do not vary"):
        mixed_anova(constant_results(), dv="recovery", within="layer", between="knowledge_type",
                    subject="probe_id", metric="logit_diff")
