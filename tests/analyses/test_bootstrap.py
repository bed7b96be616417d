"""Intervals of means: t by default; bootstrap ones reproducible, equal to scipy's, with about nominal coverage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from analyses import bootstrap_ci, prepare

from .conftest import GROUP, rm_frame

SEL = dict(metric="logit_diff", site_kind="mlp_out")


def test_table_shape_means_and_reproducibility(results):
    table = bootstrap_ci(results, between=GROUP, n_boot=500, seed=4, method="percentile", **SEL)
    assert len(table) == 6 * 2
    assert list(table.columns[:9]) == ["layer", GROUP, "mean", "ci_low", "ci_high", "sd", "n", "ci", "n_boot"]
    # Means are over probes of each probe's last-position value; incomplete probes still count where they have data.
    rows = results[(results.metric == "logit_diff") & (results.site_kind == "mlp_out") & results.recovery_defined]
    rows = rows[rows["position"] == rows["position"].max()]
    per_probe = rows.groupby(["layer", GROUP, "probe_id"])["recovery"].mean()
    expected = per_probe.groupby(["layer", GROUP]).agg(["mean", "size"])
    got = table.set_index(["layer", GROUP])
    np.testing.assert_allclose(got["mean"], expected.loc[got.index, "mean"], rtol=1e-12)
    assert (got["n"].to_numpy() == expected.loc[got.index, "size"].to_numpy()).all()
    assert (table["ci_low"] < table["mean"]).all() and (table["mean"] < table["ci_high"]).all()
    again = bootstrap_ci(results, between=GROUP, n_boot=500, seed=4, method="percentile", **SEL)
    np.testing.assert_array_equal(table["ci_low"], again["ci_low"])
    other = bootstrap_ci(results, between=GROUP, n_boot=500, seed=5, method="percentile", **SEL)
    assert not np.allclose(table["ci_low"], other["ci_low"])


def test_percentile_interval_agrees_with_scipy():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 0.3, size=(25, 1))
    ours = bootstrap_ci(rm_frame(x), n_boot=40000, seed=1, method="percentile").iloc[0]
    ref = sps.bootstrap((x[:, 0],), np.mean, n_resamples=40000, method="percentile", rng=np.random.default_rng(2))
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert ours["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.03 * se)
    assert ours["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.03 * se)
    bca = bootstrap_ci(rm_frame(x), n_boot=5000, seed=1, method="bca").iloc[0]
    assert bca["ci_low"] < ours["mean"] < bca["ci_high"] and bca["method"] == "bca"


def test_coverage_is_near_nominal():
    """The 95 % interval of the mean of 30 normal values covers the true mean in about 95 % of 300 samples
    (the percentile bootstrap under-covers slightly at small n, hence the lower bound of 0.89)."""
    rng = np.random.default_rng(3)
    hits = 0
    n_sims = 300
    values = rng.normal(0.5, 1.0, size=(n_sims, 30))
    for i in range(n_sims):
        row = bootstrap_ci(rm_frame(values[i][:, None]), n_boot=800, seed=i, method="percentile").iloc[0]
        hits += row["ci_low"] <= 0.5 <= row["ci_high"]
    assert 0.89 <= hits / n_sims <= 0.985


def test_degenerate_cells(results):
    one = bootstrap_ci(results[results.probe_id == "p000"], **SEL)
    assert (one["n"] == 1).all() and one["ci_low"].isna().all() and one["mean"].notna().all()
    flat = bootstrap_ci(rm_frame(np.full((5, 2), 0.25)))
    assert (flat["ci_low"] == 0.25).all() and (flat["ci_high"] == 0.25).all()


def test_drop_subjects_matches_the_tested_probes(results):
    prep = prepare(results, **SEL)
    table = bootstrap_ci(results, missing="drop_subjects", **SEL)
    assert (table["n"] == prep.n_subjects).all() and (table["n_dropped"] == 2).all()
