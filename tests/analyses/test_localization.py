"""Localization profiles (:mod:`analyses.localization`): measures of synthetic profiles against hand computations,
residual increments against hand differences, the group statistics against scipy / statsmodels / direct
computations, and the whole path through ``analyze`` and the report."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analyses.localization import (
    MEASURES,
    compare_localization,
    contributions,
    hodges_lehmann,
    localization_measures,
    permutation_test,
    profile_measures,
    summarize_localization,
)
from analyses.synthetic import make_meta, make_results
from clap.errors import ClapError

GROUP = "knowledge_type"


def _entropy_exp(p):
    p = np.asarray(p, float)
    p = p[p > 0]
    return math.exp(-sum(x * math.log(x) for x in p))


# ------------------------------------------------------------------------------------- synthetic profiles


def test_one_spike():
    m = profile_measures([0.0, 0.0, 1.0, 0.0, 0.0], n_layers=5)
    assert m["eff_layers_pr"] == pytest.approx(1.0)
    assert m["eff_layers_entropy"] == pytest.approx(1.0)
    assert (m["peak_layer"], m["peak_share"], m["peak_depth"]) == (2, pytest.approx(1.0), pytest.approx(0.4))
    assert (m["window_start"], m["window_end"], m["window_width"]) == (2, 2, 1)
    assert m["window_share"] == pytest.approx(1.0)
    assert m["centre_of_mass"] == pytest.approx(2 / 5)
    assert m["negative_share"] == 0.0


def test_flat_profile():
    m = profile_measures([0.25] * 4, n_layers=4)
    assert m["eff_layers_pr"] == pytest.approx(4.0)
    assert m["eff_layers_entropy"] == pytest.approx(4.0)
    assert (m["peak_layer"], m["peak_share"]) == (0, pytest.approx(0.25))  # the first of equal peaks
    assert (m["window_start"], m["window_width"]) == (0, 4)  # 3 layers hold 75 % < 80 %
    assert m["centre_of_mass"] == pytest.approx((0 + 1 + 2 + 3) / 4 / 4)


def test_flat_profile_window_at_exactly_the_coverage():
    """5 equal layers: 4 hold exactly 80 % (0.2 * 4 is 0.8000000000000002 or 0.7999999999999999 in floats)."""
    m = profile_measures([0.2] * 5)
    assert (m["window_start"], m["window_end"], m["window_width"]) == (0, 3, 4)
    assert m["window_share"] == pytest.approx(0.8)


def test_two_separated_peaks():
    m = profile_measures([0.5, 0, 0, 0, 0, 0.5], n_layers=6)
    assert m["eff_layers_pr"] == pytest.approx(2.0)
    assert m["eff_layers_entropy"] == pytest.approx(2.0)
    assert (m["peak_layer"], m["peak_share"]) == (0, pytest.approx(0.5))
    assert (m["window_start"], m["window_end"], m["window_width"]) == (0, 5, 6)  # only both peaks reach 80 %
    assert m["centre_of_mass"] == pytest.approx((0.5 * 0 + 0.5 * 5) / 6)


def test_two_unequal_peaks():
    m = profile_measures([0.85, 0, 0, 0, 0.15])
    assert m["eff_layers_pr"] == pytest.approx(1 / (0.85**2 + 0.15**2))
    assert m["eff_layers_entropy"] == pytest.approx(_entropy_exp([0.85, 0.15]))
    assert (m["window_start"], m["window_width"], m["window_share"]) == (0, 1, pytest.approx(0.85))
    assert m["centre_of_mass"] == pytest.approx(0.15 * 4 / 5)


def test_negative_lobes_use_magnitudes_and_report_the_negative_share():
    c = [0.0, 0.6, -0.2, 0.2, 0.0]
    m = profile_measures(c)
    assert m["total_abs"] == pytest.approx(1.0)
    assert m["net"] == pytest.approx(0.6)
    assert m["eff_layers_pr"] == pytest.approx(1 / (0.36 + 0.04 + 0.04))
    assert m["eff_layers_entropy"] == pytest.approx(_entropy_exp([0.6, 0.2, 0.2]))
    assert m["negative_share"] == pytest.approx(0.2)
    assert (m["window_start"], m["window_end"], m["window_width"]) == (1, 2, 2)  # 0.6 + |-0.2| = 0.8
    assert m["centre_of_mass"] == pytest.approx((0.6 * 1 + 0.2 * 2 + 0.2 * 3) / 5)
    flipped = profile_measures(np.abs(c))
    for key in ("eff_layers_pr", "eff_layers_entropy", "peak_share", "window_width", "centre_of_mass"):
        assert m[key] == pytest.approx(flipped[key])
    assert profile_measures([-0.1, -0.9])["negative_share"] == pytest.approx(1.0)


def test_equally_narrow_windows_prefer_the_one_holding_most_then_the_first():
    m = profile_measures([0.05, 0.75, 0.2])  # no single layer reaches 80 %; [0, 1] holds 0.8, [1, 2] 0.95
    assert (m["window_start"], m["window_end"], m["window_share"]) == (1, 2, pytest.approx(0.95))
    m = profile_measures([0.125, 0.75, 0.125])  # both pairs hold exactly 0.875
    assert (m["window_start"], m["window_end"]) == (0, 1)


def test_profile_of_upper_layers_uses_the_model_depth():
    m = profile_measures([0.0, 1.0, 0.0, 0.0], layers=[18, 19, 20, 21], n_layers=30)
    assert (m["first_layer"], m["last_layer"], m["peak_layer"]) == (18, 21, 19)
    assert m["peak_depth"] == pytest.approx(19 / 30)
    assert m["centre_of_mass"] == pytest.approx(19 / 30)
    assert (m["window_start"], m["window_width"]) == (19, 1)


def test_window_counts_layers_not_profile_entries():
    m = profile_measures([0.5, 0.5, 0.0, 0.0], layers=[0, 2, 4, 6])
    assert (m["window_start"], m["window_end"], m["window_width"]) == (0, 2, 3)


def test_zero_profile_has_no_shape():
    m = profile_measures([0.0, 0.0, 0.0])
    assert m["total_abs"] == 0
    assert all(np.isnan(m[k]) for k in ("eff_layers_pr", "peak_share", "window_width", "centre_of_mass"))


def test_bad_profiles_are_refused():
    with pytest.raises(ClapError, match="finite"):
        profile_measures([0.1, np.nan])
    with pytest.raises(ClapError, match="layers"):
        profile_measures([0.1, 0.2], layers=[0])


# ------------------------------------------------------------------------------------- contributions


def _resid_frame(values: dict[str, list[float]], kind: str = "resid_pre", positions: str = "each",
                 direction: str = "denoising", layers: list[int] | None = None) -> pd.DataFrame:
    """Two token positions per probe; the last one carries ``values`` per layer, position 0 a distractor 5.0."""
    rows = []
    for i, (probe, vals) in enumerate(values.items()):
        for layer, v in zip(layers or range(len(vals)), vals, strict=True):
            for pos, value in ((0, 5.0), (1, v)):
                rows.append({"probe_id": probe, GROUP: "definitional" if i % 2 else "associative",
                             "site": f"layers.{layer}.{kind}", "site_kind": kind, "layer": layer, "head": pd.NA,
                             "position": pos, "positions": positions, "operation": "replace",
                             "direction": direction, "metric": "logit_diff", "recovery": value,
                             "recovery_defined": True, "trivial": False, "window": 1})
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["head"] = frame["head"].astype("Int64")
    frame["position"] = frame["position"].astype("Int64")
    return frame


def _profile(frame: pd.DataFrame, probe: str) -> tuple[list[int], list[float]]:
    part = frame[frame["probe_id"] == probe].sort_values("layer")
    return part["layer"].tolist(), part["contribution"].tolist()


def test_resid_pre_becomes_increments_closed_at_the_last_token():
    data = _resid_frame({"a": [0.0, 0.1, 0.1, 0.7, 0.9], "b": [0.0, 0.5, 0.5, 0.5, 0.5]})
    out = contributions(data, site_kind="resid_pre", n_layers=5)
    layers, c = _profile(out, "a")
    assert layers == [0, 1, 2, 3, 4]
    assert c == pytest.approx([0.1, 0.0, 0.6, 0.2, 0.1])  # r[l+1] - r[l], last block 1 - r[4]
    assert _profile(out, "b")[1] == pytest.approx([0.5, 0, 0, 0, 0.5])
    assert "closed" in out["basis"].iloc[0]
    m = localization_measures(data, site_kind="resid_pre", n_layers=5).set_index("probe_id").loc["a"]
    a = np.array([0.1, 0.0, 0.6, 0.2, 0.1])
    assert m["eff_layers_pr"] == pytest.approx(a.sum() ** 2 / (a**2).sum())
    assert (m["peak_layer"], m["window_start"], m["window_end"]) == (2, 2, 3)  # 0.6 + 0.2 = 0.8
    assert m["centre_of_mass"] == pytest.approx((a * np.arange(5)).sum() / a.sum() / 5)


def test_noising_residual_closes_at_zero_and_components_count_the_drop():
    data = _resid_frame({"a": [1.0, 0.9, 0.9, 0.3, 0.1], "b": [1.0, 1.0, 0.5, 0.5, 0.5]}, direction="noising")
    out = contributions(data, site_kind="resid_pre", n_layers=5)
    assert _profile(out, "a")[1] == pytest.approx([-0.1, 0.0, -0.6, -0.2, -0.1])
    m = localization_measures(data, site_kind="resid_pre", n_layers=5).set_index("probe_id")
    assert m.loc["a", "negative_share"] == pytest.approx(1.0)
    comp = _resid_frame({"a": [1.0, 0.4, 1.0], "b": [0.9, 1.0, 1.0]}, kind="attn_out", direction="noising")
    assert _profile(contributions(comp, site_kind="attn_out", n_layers=3), "a")[1] == pytest.approx([0, -0.6, 0])


def test_residual_closure_only_where_the_final_state_is_known():
    values = {"a": [0.0, 0.1, 0.1, 0.7, 0.9], "b": [0.0, 0.5, 0.5, 0.5, 0.5]}
    cross = contributions(_resid_frame(values), site_kind="resid_pre", n_layers=5, cross_model=True)
    assert _profile(cross, "a") == ([0, 1, 2, 3], pytest.approx([0.1, 0.0, 0.6, 0.2]))
    assert "left out" in cross["basis"].iloc[0]
    subject_only = contributions(_resid_frame(values, positions="match:Paris"), site_kind="resid_pre", n_layers=5)
    assert _profile(subject_only, "a")[0] == [0, 1, 2, 3]
    deeper = contributions(_resid_frame(values), site_kind="resid_pre", n_layers=8)  # layers 5-7 not patched
    assert _profile(deeper, "a")[0] == [0, 1, 2, 3]


def test_resid_post_increments_belong_to_the_block_after():
    # resid_post at layers 0-3 of a 5-layer model (layer 4's is trivial and excluded): blocks 1-4
    data = _resid_frame({"a": [0.1, 0.1, 0.7, 0.9], "b": [0.2, 0.4, 0.6, 0.8]}, kind="resid_post")
    out = contributions(data, site_kind="resid_post", n_layers=5)
    assert _profile(out, "a") == ([1, 2, 3, 4], pytest.approx([0.0, 0.6, 0.2, 0.1]))


def test_residual_increments_need_one_position_and_consecutive_layers():
    data = _resid_frame({"a": [0.0, 0.1, 0.7], "b": [0.0, 0.5, 0.5]})
    with pytest.raises(ClapError, match="one token per probe"):
        contributions(data, site_kind="resid_pre", position_reduction="max")
    gaps = _resid_frame({"a": [0.0, 0.1, 0.7], "b": [0.0, 0.5, 0.5]}, layers=[0, 2, 4])
    with pytest.raises(ClapError, match="consecutive"):
        contributions(gaps, site_kind="resid_pre")


def test_components_are_their_own_recovery_at_the_analysed_position():
    data = _resid_frame({"a": [0.1, 0.6, -0.2], "b": [0.0, 0.3, 0.3]}, kind="mlp_out")
    out = contributions(data, between=GROUP, site_kind="mlp_out", n_layers=3)
    assert _profile(out, "a")[1] == pytest.approx([0.1, 0.6, -0.2])  # position 0's 5.0 is not the last token
    part = out[out["probe_id"] == "a"].sort_values("layer")
    assert part["share"].tolist() == pytest.approx([0.1 / 0.9, 0.6 / 0.9, -0.2 / 0.9])
    assert part["rel_depth"].tolist() == pytest.approx([0, 1 / 3, 2 / 3])
    assert set(out[GROUP]) == {"associative", "definitional"}


def test_heads_are_summed_per_layer():
    data = make_results(n_probes=4, n_layers=3, site_kinds=("mlp_out",), metrics=("logit_diff",), tokens=("x",),
                        trivial_sites=False, seed=2)
    heads = []
    for h in range(3):
        part = data.copy()
        part["site_kind"] = "head"
        part["head"] = pd.array([h] * len(part), dtype="Int64")
        part["site"] = [f"layers.{int(layer)}.heads.{h}" for layer in part["layer"]]
        part["recovery"] = part["recovery"] * (h + 1)
        heads.append(part)
    heads = pd.concat(heads, ignore_index=True)
    out = contributions(heads, site_kind="head", n_layers=3)
    expected = data.set_index(["probe_id", "layer"])["recovery"] * 6  # 1 + 2 + 3
    got = out.set_index(["probe_id", "layer"])["contribution"]
    assert got.to_numpy() == pytest.approx(expected.reindex(got.index).to_numpy())
    assert "heads summed" in out["basis"].iloc[0]
    with pytest.raises(ClapError, match="heads summed"):  # the legacy agg would average the heads
        contributions(heads, site_kind="head", agg="mean")


def test_windows_and_raw_modules_are_left_out():
    data = _resid_frame({"a": [0.1, 0.6, 0.2], "b": [0.0, 0.3, 0.3]}, kind="attn_out")
    windowed = data.assign(window=3, recovery=99.0, site=data["site"] + "@w3")
    out = contributions(pd.concat([data, windowed]), site_kind="attn_out", n_layers=3)
    assert out["contribution"].abs().max() < 1
    with pytest.raises(ClapError, match="no per-layer contribution"):
        contributions(data.assign(site_kind="module"), site_kind="module")


# ------------------------------------------------------------------------------------- group statistics


A = np.array([1.2, 3.4, 2.2, 5.0])
B = np.array([0.1, 0.5, 2.9, 1.7, 0.3])


def _enumerated_p(a: np.ndarray, b: np.ndarray) -> float:
    """Every split of the pooled values into groups of the original sizes; two-sided p = 2 min(one-sided)."""
    pooled = np.concatenate([a, b])
    obs = a.mean() - b.mean()
    stats = []
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        stats.append(pooled[mask].mean() - pooled[~mask].mean())
    stats = np.array(stats)
    tol = 100 * np.finfo(float).eps * abs(obs)
    less, greater = np.mean(stats <= obs + tol), np.mean(stats >= obs - tol)
    return min(1.0, 2 * min(less, greater))


def test_permutation_test_exact_equals_scipy_and_enumeration():
    diff, p, exact = permutation_test(A, B)
    ref = sps.permutation_test((A, B), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                               permutation_type="independent", vectorized=True, n_resamples=np.inf)
    assert exact and diff == pytest.approx(A.mean() - B.mean())
    assert p == pytest.approx(ref.pvalue, abs=1e-15)
    assert p == pytest.approx(_enumerated_p(A, B), abs=1e-15)


def test_permutation_test_random_relabellings_approximate_the_exact_p():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.6, 1, 8), rng.normal(0, 1, 8)  # 12870 splits: more than 9999, so random
    _, p, exact = permutation_test(a, b, seed=3)
    ref = sps.permutation_test((a, b), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                               permutation_type="independent", vectorized=True, n_resamples=9999,
                               rng=np.random.default_rng(3))
    assert not exact
    assert p == pytest.approx(ref.pvalue)
    truth = _enumerated_p(a, b)
    assert abs(p - truth) < 4 * math.sqrt(truth * (1 - truth) / 9999) + 1e-4


def test_hodges_lehmann_is_the_median_of_all_pairwise_differences():
    direct = sorted(x - y for x in A for y in B)
    n = len(direct)
    median = direct[n // 2] if n % 2 else (direct[n // 2 - 1] + direct[n // 2]) / 2
    assert hodges_lehmann(A, B) == pytest.approx(median)
    assert hodges_lehmann(A + 3.0, A) == pytest.approx(3.0)


def _measure_frame() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    rows = []
    for g, shift, n in (("associative", 0.0, 7), ("definitional", 1.5, 6)):
        for i in range(n):
            rows.append({"probe_id": f"{g[0]}{i}", GROUP: g,
                         **{m: float(rng.normal(shift * (k % 3 == 0), 1.0)) for k, m in enumerate(MEASURES)}})
    return pd.DataFrame(rows)


def test_group_comparison_against_scipy_and_statsmodels():
    from statsmodels.stats.multitest import multipletests

    m = _measure_frame()
    t = compare_localization(m, GROUP).set_index("measure")
    assert list(t.index) == list(MEASURES)
    for name in MEASURES:
        a = m.loc[m[GROUP] == "associative", name].to_numpy()
        b = m.loc[m[GROUP] == "definitional", name].to_numpy()
        r = t.loc[name]
        assert (r["A"], r["B"], r["n_A"], r["n_B"]) == ("associative", "definitional", 7, 6)
        assert r["diff"] == pytest.approx(a.mean() - b.mean())
        # Welch interval by hand: Welch-Satterthwaite df, t quantile
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
        assert (r["ci_low"], r["ci_high"]) == (pytest.approx(r["diff"] - half), pytest.approx(r["diff"] + half))
        mwu = sps.mannwhitneyu(a, b, alternative="two-sided")
        assert (r["U"], r["p_mwu"]) == (pytest.approx(mwu.statistic), pytest.approx(mwu.pvalue))
        wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
        assert r["U"] == pytest.approx(wins)
        assert r["cles"] == pytest.approx(wins / (len(a) * len(b)))
        assert r["hl_shift"] == pytest.approx(np.median([x - y for x in a for y in b]))
        assert r["p_perm"] == pytest.approx(permutation_test(a, b)[1])
    for col in ("p_perm", "p_mwu"):
        holm = multipletests(t[col].to_numpy(), method="holm")[1]
        assert t[f"{col}_holm"].to_numpy() == pytest.approx(holm)
    # the concentration measures name the group the difference points to
    pr = t.loc["eff_layers_pr"]
    assert pr["more_localized"] == ("associative" if pr["diff"] < 0 else "definitional")
    ps = t.loc["peak_share"]
    assert ps["more_localized"] == ("associative" if ps["diff"] > 0 else "definitional")
    assert pd.isna(t.loc["centre_of_mass", "more_localized"])


def test_group_comparison_leaves_untestable_measures_empty():
    m = _measure_frame()
    m.loc[m[GROUP] == "definitional", "peak_share"] = np.nan
    m.loc[m[GROUP] == "definitional", "peak_share"] = [0.3, np.nan, np.nan, np.nan, np.nan, np.nan]
    m["negative_share"] = 0.0
    t = compare_localization(m, GROUP).set_index("measure")
    assert np.isnan(t.loc["peak_share", "p_perm"]) and "fewer than 2" in t.loc["peak_share", "note"]
    assert np.isnan(t.loc["negative_share", "p_perm"]) and "same value" in t.loc["negative_share", "note"]
    finite = t["p_perm"].notna()
    from statsmodels.stats.multitest import multipletests

    assert t.loc[finite, "p_perm_holm"].to_numpy() == pytest.approx(
        multipletests(t.loc[finite, "p_perm"].to_numpy(), method="holm")[1])


def test_group_summary_is_the_t_interval_of_each_measure():
    m = _measure_frame()
    s = summarize_localization(m, GROUP).set_index([GROUP, "measure"])
    x = m.loc[m[GROUP] == "definitional", "window_width"].to_numpy()
    r = s.loc[("definitional", "window_width")]
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert (r["n"], r["mean"]) == (6, pytest.approx(x.mean()))
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(x.mean() - half), pytest.approx(x.mean() + half))


# ------------------------------------------------------------------------------------- through analyze


def _planted(tmp_path, spike_group: str = "definitional", same: bool = False):
    """One group with its contributions at one layer (a spike), the other spread evenly (or both spread)."""
    from analyses.io import save_results

    n_layers = 8
    spike = [0, 0, 0, 0, 1.2, 0, 0, 0]
    flat = [0.25] * n_layers
    common = dict(n_layers=n_layers, site_kinds=("attn_out", "mlp_out"), metrics=("logit_diff",), tokens=("x", "y"),
                  noise_sd=0.03, probe_sd=0.0, trivial_sites=False)
    other = "associative" if spike_group == "definitional" else "definitional"
    a = make_results(n_probes=8, groups={GROUP: (spike_group,)}, layer_effect=flat if same else spike, seed=1,
                     **common)
    b = make_results(n_probes=8, groups={GROUP: (other,)}, layer_effect=flat, seed=2, **common)
    b["probe_id"] = b["probe_id"].str.replace("p", "q")
    data = pd.concat([a, b], ignore_index=True)
    return save_results(data, make_meta(data, seed=0, group_columns=[GROUP]), tmp_path / "run")


def test_analyze_reports_the_localization_tables_and_answer(tmp_path):
    from analyses.pipeline import analyze
    from analyses.report import render_html, render_markdown

    run = _planted(tmp_path)
    result = analyze(run, figures=False, n_boot=50)
    tests = result.tables["localization_tests"]
    assert set(tests["site_kind"]) == {"attn_out", "mlp_out"}
    pr = tests[(tests["measure"] == "eff_layers_pr") & (tests["site_kind"] == "mlp_out")].iloc[0]
    assert pr["more_localized"] == "definitional" and pr["p_perm_holm"] < 0.05
    # the per-probe table equals the measures computed from the analysed data directly
    loc = result.tables["localization"]
    direct = localization_measures(result.data, between=GROUP, site_kind="mlp_out", n_layers=8)
    got = loc[loc["site_kind"] == "mlp_out"].reset_index(drop=True)
    assert got["eff_layers_pr"].to_numpy() == pytest.approx(direct["eff_layers_pr"].to_numpy())
    for name in ("localization.csv", "localization_tests.csv", "localization_groups.csv",
                 "localization_contributions.csv"):
        assert (result.out_dir / name).exists()
    html, md = render_html(result), render_markdown(result)
    assert "Localization profiles" in html and "## Localization profiles" in md
    assert "`knowledge_type` = definitional is more localized than associative here" in md
    assert f"{pr['diff']:.3f}" in html  # the comparison table's number
    assert any("converted to layer-to-layer increments" in m for m in result.methods)
    assert any("permutation test" in m and "Holm" in m for m in result.methods)


def test_analyze_says_when_the_data_cannot_tell(tmp_path):
    from analyses.pipeline import analyze
    from analyses.report import render_markdown

    result = analyze(_planted(tmp_path, same=True), figures=False, n_boot=50)
    tests = result.tables["localization_tests"]
    loc = tests[tests["measure"].isin(["eff_layers_pr", "eff_layers_entropy", "peak_share", "window_width"])]
    assert not (loc["p_perm_holm"] < 0.05).any()  # NaN where every probe has the same window
    assert "the data cannot tell whether `knowledge_type` = associative or definitional is more localized" in \
        render_markdown(result)


def test_analyze_draws_the_localization_figures(tmp_path):
    from analyses.pipeline import analyze
    from analyses.report import render_html

    result = analyze(_planted(tmp_path), figures=True, n_boot=50, site_kinds=["mlp_out"])
    names = {f.name for f in result.figures}
    slug = "logit-diff-replace-denoising-all"
    assert {n for n in names if n.startswith("localization_")} == {f"localization_profiles_{slug}",
                                                                  f"localization_measures_{slug}"}
    assert all(p.exists() for f in result.figures for p in f.paths)
    html = render_html(result)
    section = html[html.index('id="localization"'):]
    assert 'id="fig-localization_profiles_' in section and 'id="fig-localization_measures_' in section


def test_analyze_records_slices_it_cannot_profile(tmp_path):
    from analyses.io import save_results
    from analyses.pipeline import analyze

    data = make_results(n_probes=6, n_layers=4, site_kinds=("mlp_out", "module"), metrics=("logit_diff",),
                        tokens=("x",), trivial_sites=False, seed=4)
    run = save_results(data, make_meta(data, seed=0, group_columns=[GROUP]), tmp_path / "run")
    result = analyze(run, figures=False, n_boot=50)
    skipped = result.tables["skipped"]
    refused = skipped[(skipped["test"] == "localization") & (skipped["site_kind"] == "module")]
    assert len(refused) == 1 and "no per-layer contribution" in refused["reason"].iloc[0]
    assert set(result.tables["localization"]["site_kind"]) == {"mlp_out"}


# ------------------------------------------------------------------------------------- figures


def _two_kinds():
    data = make_results(n_probes=8, n_layers=6, site_kinds=("attn_out", "mlp_out"), metrics=("logit_diff",),
                        tokens=("x", "y"), trivial_sites=False, seed=6)
    contrib = pd.concat([contributions(data, between=GROUP, site_kind=k, n_layers=6) for k in ("attn_out", "mlp_out")],
                        ignore_index=True)
    from analyses.localization import measures_from_contributions

    measures = pd.concat([measures_from_contributions(contrib[contrib["site_kind"] == k], between=GROUP)
                          for k in ("attn_out", "mlp_out")], ignore_index=True)
    return contrib, measures


def _readable(fig):
    from matplotlib.text import Text

    from analyses.figures import COLUMN_WIDTH_IN, MIN_FONT_PT

    fig.canvas.draw()
    assert fig.get_size_inches()[0] == pytest.approx(COLUMN_WIDTH_IN)
    small = [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT_PT]
    assert not small, small


def test_profile_map_shows_each_probe_share_grouped_and_ordered_by_centre_of_mass():
    from analyses.localization_figures import profile_map

    contrib, measures = _two_kinds()
    fig = profile_map(contrib, measures, GROUP)
    _readable(fig)
    panels = [a for a in fig.axes if a.get_title(loc="left")]
    assert [a.get_title(loc="left") for a in panels] == ["attn_out", "mlp_out"]
    ax = panels[1]
    m = measures[measures["site_kind"] == "mlp_out"]
    order = m.sort_values([GROUP, "centre_of_mass"])["probe_id"].tolist()
    expected = (contrib[contrib["site_kind"] == "mlp_out"].pivot(index="probe_id", columns="layer", values="share")
                .reindex(order).to_numpy())
    values = np.ma.asarray(ax.collections[0].get_array()).reshape(expected.shape)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    dots = ax.collections[1].get_offsets()  # the centre of mass of each row, in layer units (+ 0.5: cell centres)
    com = m.set_index("probe_id").loc[order, "centre_of_mass"].to_numpy() * 6
    np.testing.assert_allclose(np.asarray(dots)[:, 0], com + 0.5, rtol=1e-12)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["associative\n(n = 4)", "definitional\n(n = 4)"]


def test_measure_figure_draws_each_group_mean_with_its_t_interval():
    from analyses.localization_figures import measures_by_group

    contrib, measures = _two_kinds()
    summary = pd.concat([summarize_localization(measures[measures["site_kind"] == k], GROUP)
                         .assign(site_kind=k) for k in ("attn_out", "mlp_out")], ignore_index=True)
    fig = measures_by_group(measures, summary, GROUP)
    _readable(fig)
    panels = [a for a in fig.axes if a.get_visible() and a.get_title(loc="left")]
    assert len(panels) == len(MEASURES)
    ax = panels[0]  # effective layers (participation ratio)
    bars = ax.containers  # one error bar per group and site kind, groups in sorted order
    row = summary[(summary["measure"] == "eff_layers_pr") & (summary["site_kind"] == "mlp_out")
                  & (summary[GROUP] == "definitional")].iloc[0]
    line, _, (vertical,) = bars[3]  # definitional, mlp_out (associative attn/mlp first)
    assert line.get_ydata()[0] == pytest.approx(row["mean"])
    segment = vertical.get_segments()[0]
    assert (segment[0][1], segment[1][1]) == (pytest.approx(row["ci_low"]), pytest.approx(row["ci_high"]))
