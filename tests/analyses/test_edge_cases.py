"""Statistics edge cases: undefined slices, no error variance, infinite recoveries, a single group."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses.io import save_results
from analyses.pipeline import analyze
from analyses.select import select_rows
from analyses.stats import mixed_anova, pairwise_within, rm_anova
from analyses.synthetic import make_meta, make_results
from clap.app.cli import main
from clap.errors import ClapError

from .conftest import GROUP, constant_results, rm_frame


def test_a_wholly_undefined_slice_is_skipped_not_fatal(tmp_path):
    data = make_results(n_probes=6, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff", "prob"),
                        tokens=("a", " b"), seed=1)
    prob = data["metric"] == "prob"
    data.loc[prob, "recovery"] = np.nan
    data.loc[prob, "recovery_defined"] = False
    save_results(data, make_meta(data), tmp_path / "r")
    result = analyze(tmp_path / "r", figures=True)
    skipped = result.tables["skipped"]
    assert {"rm_anova", "mixed_anova", "figure:heatmap_layer_position"} <= set(
        skipped.loc[skipped.metric == "prob", "test"])
    assert (result.tables["rm_anova"]["metric"] == "logit_diff").all()
    assert "figure:heatmap_layer_position" in pd.read_csv(tmp_path / "r" / "analysis" / "skipped.csv")["test"].tolist()


def test_no_error_variance_is_undefined_not_a_huge_f():
    # every probe shows the same layer profile up to a constant: residuals are rounding noise
    values = np.arange(6)[:, None] * 0.1 + np.array([0.0, 0.3, 0.7, 0.2])
    with pytest.raises(ClapError, match="no error variance"):
        rm_anova(rm_frame(values))
    with pytest.raises(ClapError, match="no error variance"):
        mixed_anova(rm_frame(values, ["a", "b"] * 3), between=GROUP)
    post = pairwise_within(rm_frame(values))
    assert post["T"].isna().all() and (post["note"] == "undefined: the paired differences do not vary").all()


def test_some_undefined_pairs_leave_the_correction_family():
    rng = np.random.default_rng(0)
    values = np.column_stack([np.arange(8) * 0.1, np.arange(8) * 0.1 + 0.5, rng.normal(0, 1, 8)])
    post = pairwise_within(rm_frame(values)).set_index(["A", "B"])
    assert np.isnan(post.loc[(0, 1), "T"]) and post.loc[(0, 1), "note"] != ""
    p = post.loc[[(0, 2), (1, 2)], "p_unc"].to_numpy()
    holm = np.minimum(1, np.maximum.accumulate(np.sort(p) * np.array([2, 1])))  # Holm over the 2 defined pairs
    np.testing.assert_allclose(np.sort(post.loc[[(0, 2), (1, 2)], "p_corr"].to_numpy()), holm)


def test_infinite_recoveries_are_excluded_and_counted_like_nan():
    rng = np.random.default_rng(1)
    frame = rm_frame(rng.normal(0, 1, (6, 3)))
    frame.loc[0, "recovery"] = np.inf
    frame.loc[4, "recovery"] = -np.inf
    sel = select_rows(frame, require_layer=False)
    assert sel.n_undefined == 2
    row = rm_anova(frame).iloc[0]  # the two probes with an infinite value are incomplete and dropped
    assert row["n_undefined"] == 2 and row["n_subjects"] == 4 and np.isfinite(row["F"])


def test_one_group_records_the_group_tests_as_skipped_and_methods_do_not_claim_them(tmp_path):
    data = make_results(n_probes=6, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a",),
                        groups={GROUP: ("definitional",)}, seed=2)
    save_results(data, make_meta(data, group_columns=[GROUP]), tmp_path / "r")
    result = analyze(tmp_path / "r", figures=False)
    skipped = result.tables["skipped"]
    reasons = skipped.set_index("test")["reason"]
    assert "only one knowledge_type group (definitional)" in reasons["mixed_anova"]
    assert "posthoc_groups" in reasons.index
    assert result.tables["mixed_anova"].empty
    methods = " ".join(result.methods)
    assert "Mixed ANOVA" not in methods and "Welch" not in methods and "only one `knowledge_type` group" in methods
    assert result.options["group"] is None and result.options["group_requested"] == GROUP


# regression (review): `clap analyze` records a slice without variance as skipped instead of crashing
def test_analyze_records_the_untestable_slice_instead_of_crashing(tmp_path):
    data = constant_results()
    save_results(data, make_meta(data, group_columns=["knowledge_type"]), tmp_path)
    assert main(["analyze", str(tmp_path), "--no-figures"]) == 0
    skipped = (tmp_path / "analysis" / "skipped.csv").read_text()
    assert "do not vary" in skipped
