"""The additivity and ablation tables against hand computations on planted values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats as sps

from analyses.ablation import ablation_cells, ablation_summary, head_rank_agreement
from analyses.additivity import additivity_cells, findings_sentences, gap_summary, pair_summary

SINGLE = {  # probe -> layer -> single-layer recovery of attn_out
    "a": [0.1, 0.5, 0.2, 0.0],
    "b": [0.0, 0.3, 0.4, 0.1],
    "c": [0.2, 0.2, 0.1, 0.3],
}
GROUP = {"a": "def", "b": "def", "c": "assoc"}


def _singles() -> pd.DataFrame:
    rows = [{"probe_id": p, "knowledge_type": GROUP[p], "site": f"layers.{layer}.attn_out", "site_kind": "attn_out",
             "layer": layer, "head": pd.NA, "positions": "last", "operation": "replace", "metric": "logit_diff",
             "window": 1, "recovery": v} for p, values in SINGLE.items() for layer, v in enumerate(values)]
    rows.append({**rows[0], "metric": "prob", "recovery": 99.0})  # another metric: ignored
    return pd.DataFrame(rows).astype({"head": "Int64"})


def _design_and_joint():
    """Bottom stacks 0..1 and 0..3, top-2 sets and one pair per probe, with planted joint values."""
    design, joint = [], []
    planted = {"a": {"0,1": 0.5, "0,1,2,3": 0.9, "1,2": 0.6}, "b": {"0,1": 0.2, "0,1,2,3": 0.7, "1,2": 0.8},
               "c": {"0,1": 0.5, "0,1,2,3": 0.6, "0,3": 0.4}}
    for p, sets in planted.items():
        for layers, value in sets.items():
            n = len(layers.split(","))
            if layers.startswith("0,1") and n in (2, 4):
                family, k, site = "bottom", n - 1, f"layers[0:{n}].attn_out"
                design.append({"probe_id": p, "site_kind": "attn_out", "family": family, "k": k, "size": n,
                               "layers": layers, "ranks": "", "site": site})
            if n == 2 and layers != "0,1":
                site = "+".join(f"layers.{v}.attn_out" for v in layers.split(","))
                design.append({"probe_id": p, "site_kind": "attn_out", "family": "top_m", "k": 2, "size": 2,
                               "layers": layers, "ranks": "1,2", "site": site})
                design.append({"probe_id": p, "site_kind": "attn_out", "family": "pair", "k": None, "size": 2,
                               "layers": layers, "ranks": "1,2", "site": site})
            site = design[-1]["site"]
            joint.append({"probe_id": p, "site": site, "metric": "logit_diff", "positions": "last", "recovery": value})
    return pd.DataFrame(design), pd.DataFrame(joint)


def test_gaps_and_interactions_equal_a_hand_computation():
    design, joint = _design_and_joint()
    cells = additivity_cells(_singles(), joint, design, group="knowledge_type")
    by = cells.set_index(["probe_id", "family", "layers"])
    # by hand: joint - the sum of the layers' single values
    assert by.loc[("a", "bottom", "0,1"), "gap"] == pytest.approx(0.5 - (0.1 + 0.5))
    assert by.loc[("a", "bottom", "0,1,2,3"), "gap"] == pytest.approx(0.9 - 0.8)
    assert by.loc[("b", "pair", "1,2"), "gap"] == pytest.approx(0.8 - 0.3 - 0.4)
    assert by.loc[("c", "pair", "0,3"), "gap"] == pytest.approx(0.4 - 0.2 - 0.3)
    assert by.loc[("a", "bottom", "0,1"), "knowledge_type"] == "def"
    gaps = gap_summary(cells, "knowledge_type")
    whole = gaps[(gaps.family == "bottom") & (gaps.k == 3) & (gaps.knowledge_type == "all")].iloc[0]
    values = np.array([0.9 - 0.8, 0.7 - 0.8, 0.6 - 0.8])
    half = sps.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
    assert whole.n == 3 and whole.gap == pytest.approx(values.mean())
    assert (whole.ci_low, whole.ci_high) == pytest.approx((values.mean() - half, values.mean() + half))
    assert whole.p_unc == pytest.approx(sps.ttest_1samp(values, 0).pvalue)
    assert whole.joint == pytest.approx(np.mean([0.9, 0.7, 0.6])) and whole.sum_single == pytest.approx(0.8)
    defs = gaps[(gaps.family == "bottom") & (gaps.k == 3) & (gaps.knowledge_type == "def")].iloc[0]
    assert defs.n == 2 and defs.gap == pytest.approx(np.mean(values[:2]))
    pairs = pair_summary(cells, "knowledge_type")
    row = pairs[(pairs.ranks == "1,2") & (pairs.knowledge_type == "all")].iloc[0]
    interactions = [0.6 - 0.5 - 0.2, 0.8 - 0.3 - 0.4, 0.4 - 0.2 - 0.3]
    assert row.n == 3 and row.gap == pytest.approx(np.mean(interactions))
    text = findings_sentences(gaps, "knowledge_type")[0]
    assert "all layers together 0.733 vs the sum of single layers 0.800 (gap -0.067" in text


def test_ablation_tables_equal_a_hand_computation():
    rng = np.random.default_rng(3)
    probes, heads = [f"p{i}" for i in range(6)], [(layer, h) for layer in range(2) for h in range(3)]
    clean = {p: 2.0 + i for i, p in enumerate(probes)}
    drop = {(p, lh): float(rng.normal(lh[0] + lh[1], 0.5)) for p in probes for lh in heads}
    rows, patch = [], []
    for p in probes:
        for layer, h in heads:
            base = {"probe_id": p, "knowledge_type": "def" if p < "p3" else "assoc",
                    "site": f"layers.{layer}.heads.{h}", "site_kind": "head", "layer": layer, "head": h,
                    "positions": "last", "metric": "logit_diff"}
            rows.append({**base, "operation": "zero", "clean": clean[p], "corrupted": clean[p],
                         "patched": clean[p] - drop[(p, (layer, h))]})
            patch.append({**base, "operation": "replace", "recovery": float(rng.normal(h, 1.0))})
    frame, patching = pd.DataFrame(rows), pd.DataFrame(patch)
    cells = ablation_cells(frame)
    summary = ablation_summary(cells, "knowledge_type")
    site = summary[(summary.site == "layers.1.heads.2") & (summary.knowledge_type == "all")].iloc[0]
    changes = np.array([-drop[(p, (1, 2))] for p in probes])
    assert site.change == pytest.approx(changes.mean()) and site.n == 6
    half = sps.t.ppf(0.975, 5) * changes.std(ddof=1) / np.sqrt(6)
    assert (site.ci_low, site.ci_high) == pytest.approx((changes.mean() - half, changes.mean() + half))
    agreement = head_rank_agreement(cells, patching, n_boot=200, n_perm=999, seed=1).iloc[0]
    x = [np.mean([drop[(p, lh)] for p in probes]) for lh in heads]
    y = [patching[(patching.layer == lh[0]) & (patching["head"] == lh[1])].recovery.mean() for lh in heads]
    assert agreement.rho == pytest.approx(sps.spearmanr(x, y).statistic)
    assert agreement.n_heads == 6 and agreement.n_probes == 6
    assert 0 < agreement.p_perm <= 1 and agreement.ci_low <= agreement.rho <= agreement.ci_high
    bad = frame.assign(corrupted=frame.clean + 1)
    with pytest.raises(Exception, match="corrupted baseline differs from its clean one"):
        ablation_cells(bad)


def test_gap_display_lays_out_top_m_and_pair_gaps_per_site_kind_and_group():
    from analyses.additivity import gap_display
    from analyses.formatting import fmt, interval

    rows = []
    for group in ("all", "a", "b"):
        for k, gap in ((5, -0.3), (2, -0.1)):
            rows.append({"site_kind": "attn_out", "family": "top_m", "k": k, "grp": group, "n": 4, "joint": 1.0,
                         "sum_single": 1.0 - gap, "gap": gap, "gap_sd": 0.1, "ci_low": gap - 0.05,
                         "ci_high": gap + 0.05, "T": -3.0, "p_unc": 0.01})
        rows.append({"site_kind": "attn_out", "family": "pair", "k": None, "grp": group, "n": 4, "joint": 0.5,
                     "sum_single": 0.52, "gap": -0.02, "gap_sd": 0.01, "ci_low": -0.03, "ci_high": -0.01, "T": -4.0,
                     "p_unc": 0.02})
        rows.append({"site_kind": "attn_out", "family": "bottom", "k": 3, "grp": group, "n": 4, "joint": 0.9,
                     "sum_single": 0.95, "gap": -0.05, "gap_sd": 0.01, "ci_low": -0.06, "ci_high": -0.04, "T": -9.0,
                     "p_unc": 0.001})
    table = gap_display(pd.DataFrame(rows))
    assert list(table.columns) == ["site kind", "grp", "n", "top 2", "top 5", "pairs"]
    assert list(table["grp"]) == ["all", "a", "b"]
    assert table.loc[0, "top 5"] == f"{fmt(-0.3)} {interval(-0.35, -0.25)}"
    assert table.loc[0, "pairs"] == f"{fmt(-0.02)} {interval(-0.03, -0.01)}"
    assert gap_display(pd.DataFrame(rows).query("family == 'bottom'")).empty
