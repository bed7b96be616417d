"""``clap compare`` states its findings (written into compare.html / compare.md and findings.json for the study
page); every number in them is checked here against scipy and statsmodels on the per-probe values."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy import stats as sps

from analyses.compare import compare
from analyses.formatting import fmt as _fmt
from analyses.synthetic import write_synthetic


def test_comparison_findings_match_independent_tests(tmp_path):
    from statsmodels.stats.anova import AnovaRM

    kw = dict(n_probes=10, n_layers=5, site_kinds=("mlp_out",), metrics=("logit_diff",), tokens=("x",),
              trivial_sites=False)
    a = write_synthetic(tmp_path / "a", **kw)
    b = write_synthetic(tmp_path / "b", layer_effect=1.4, seed=1, **kw)
    result = compare(a, b, tmp_path / "cmp", figures=False)
    record = json.loads((tmp_path / "cmp" / "findings.json").read_text())
    (block,) = record["slices"]
    model, interaction, largest = block["headline"]

    paired = pd.read_csv(tmp_path / "cmp" / "paired_differences.csv")
    long = pd.concat([paired.assign(model="A", value=paired["value_A"]),
                      paired.assign(model="B", value=paired["value_B"])])[["probe_id", "layer", "model", "value"]]
    table = AnovaRM(long, "value", "probe_id", within=["layer", "model"]).fit().anova_table
    f_model = table.loc["model", "F Value"]
    assert f"F(1, 9) = {_fmt(f_model)}" in model
    assert ("No evidence that mean" in model) == (table.loc["model", "Pr > F"] >= 0.05)
    assert f"layer x model F(4, 36) = {_fmt(table.loc['layer:model', 'F Value'])}" in interaction

    means = paired.groupby("layer")["diff"].mean()
    top = means.abs().idxmax()
    cell = paired[paired["layer"] == top]
    t = sps.ttest_rel(cell["value_B"], cell["value_A"])
    assert largest.startswith(f"Largest per-layer difference: {'+' if means[top] > 0 else ''}{_fmt(means[top])} at "
                              f"layer {top} ")
    p_text = f"p = {_fmt(t.pvalue)}" if t.pvalue >= 1e-4 else "p < 0.0001"
    assert f"{p_text} uncorrected" in largest
    holm = result.differences.set_index("layer").loc[top, "p_corr"]
    assert f"Holm p_corr = {_fmt(holm)}" in largest
    md = (tmp_path / "cmp" / "compare.md").read_text()
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "## Findings" in md and all(f"- {x}" in md for x in block["headline"])
    assert "<h2>Findings</h2>" in html and "Groups: `knowledge_type`" in md
    assert np.isfinite(f_model)
